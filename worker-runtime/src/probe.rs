//! Health probes: a profile's `probe` table and `on_unhealthy` key, their checks, and one
//! probe attempt of each kind (`exec`, `http`, `tcp`). The loop that runs a worker's probe
//! and turns results into its health lives in `runtime/probing.rs`.
//!
//! A probe's target (the command line, the URL, the address) is the operator's config: it is
//! held in [`Redacted`] values, so `Debug` never shows it, and no error or view carries it.

use std::time::Duration;

use registry_core::{de, ProbeKind, Redacted};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest probe interval, timeout and initial delay: one day.
const MAX_PROBE_DURATION: Duration = Duration::from_secs(24 * 60 * 60);
/// Shortest probe interval.
const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// Largest `failure_threshold` and `success_threshold`.
const MAX_THRESHOLD: u32 = 1000;
/// Most bytes of an HTTP answer read to find its status line.
const MAX_STATUS_LINE: usize = 8 * 1024;

/// A profile's `probe`: how the runtime checks that a running worker is healthy. Exactly one
/// of `exec`, `http` and `tcp`, e.g. in TOML:
///
/// ```toml
/// probe = { http = "http://127.0.0.1:8080/healthz", interval = "5s", timeout = "1s",
///           failure_threshold = 3, success_threshold = 1, initial_delay = "2s" }
/// ```
///
/// `Debug` output never shows the target.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    /// A command run on the host, with the worker's environment and working directory; exit
    /// code 0 is a success.
    #[serde(default)]
    pub exec: Option<Redacted<Vec<String>>>,
    /// `http://HOST[:PORT][/PATH]`: a `GET`; a 2xx or 3xx status is a success.
    #[serde(default)]
    pub http: Option<Redacted<String>>,
    /// `HOST:PORT`: a TCP connect; an accepted connection is a success.
    #[serde(default)]
    pub tcp: Option<Redacted<String>>,
    /// Time from the start of one probe to the start of the next. Default 10 s.
    #[serde(default = "default_interval", deserialize_with = "de::duration")]
    pub interval: Duration,
    /// A probe that has not succeeded within this counts as failed. Default 1 s.
    #[serde(default = "default_timeout", deserialize_with = "de::duration")]
    pub timeout: Duration,
    /// Failures in a row that make the worker `unhealthy`. Default 3.
    #[serde(default = "default_failures")]
    pub failure_threshold: u32,
    /// Successes in a row that make the worker `healthy`. Default 1.
    #[serde(default = "default_successes")]
    pub success_threshold: u32,
    /// Time after each run's start before the first probe. Default 0.
    #[serde(default, deserialize_with = "de::duration")]
    pub initial_delay: Duration,
}

fn default_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_failures() -> u32 {
    3
}
fn default_successes() -> u32 {
    1
}

/// What happens to a worker its probe found unhealthy (a profile's `on_unhealthy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnUnhealthy {
    /// Nothing: the worker is shown `unhealthy` and keeps running. The default.
    #[default]
    None,
    /// Its process group is stopped (SIGTERM, SIGKILL after the grace) and the worker goes
    /// through its restart policy as after a failure, backoff and `max_restarts` included.
    Restart,
}

/// A probe's target, checked.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Target {
    Exec(Vec<String>),
    Http {
        host: String,
        port: u16,
        /// The request target: the path and query, from `/`.
        path: String,
    },
    Tcp {
        host: String,
        port: u16,
    },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Target({:?}, <redacted>)", self.kind())
    }
}

impl Target {
    pub(crate) fn kind(&self) -> ProbeKind {
        match self {
            Target::Exec(_) => ProbeKind::Exec,
            Target::Http { .. } => ProbeKind::Http,
            Target::Tcp { .. } => ProbeKind::Tcp,
        }
    }
}

/// A probe as the runtime runs it: the target checked, the numbers within bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProbePlan {
    pub(crate) target: Target,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) failure_threshold: u32,
    pub(crate) success_threshold: u32,
    pub(crate) initial_delay: Duration,
    pub(crate) on_unhealthy: OnUnhealthy,
}

impl Probe {
    /// Checks the probe and makes what the runtime runs. The message names the key at fault,
    /// never its value.
    pub(crate) fn plan(&self, on_unhealthy: OnUnhealthy) -> Result<ProbePlan, String> {
        let target = match (&self.exec, &self.http, &self.tcp) {
            (Some(argv), None, None) => {
                if !matches!(argv.first(), Some(p) if !p.is_empty()) {
                    return Err("`probe.exec` must hold at least the program".into());
                }
                if argv.iter().any(|a| a.contains('\0')) {
                    return Err("`probe.exec` holds a NUL character".into());
                }
                Target::Exec(argv.0.clone())
            }
            (None, Some(url), None) => parse_http(url)?,
            (None, None, Some(addr)) => {
                let (host, port) = parse_host_port(addr, None)
                    .ok_or("`probe.tcp` must look like HOST:PORT, e.g. \"127.0.0.1:8080\"")?;
                Target::Tcp { host, port }
            }
            _ => return Err("`probe` needs exactly one of `exec`, `http` and `tcp`".into()),
        };
        if self.interval < MIN_INTERVAL || self.interval > MAX_PROBE_DURATION {
            return Err("`probe.interval` must be between 10ms and a day".into());
        }
        if self.timeout.is_zero() || self.timeout > MAX_PROBE_DURATION {
            return Err("`probe.timeout` must be more than 0 and at most a day".into());
        }
        if self.initial_delay > MAX_PROBE_DURATION {
            return Err("`probe.initial_delay` is at most a day".into());
        }
        for (key, n) in [
            ("failure_threshold", self.failure_threshold),
            ("success_threshold", self.success_threshold),
        ] {
            if n == 0 || n > MAX_THRESHOLD {
                return Err(format!(
                    "`probe.{key}` must be between 1 and {MAX_THRESHOLD}"
                ));
            }
        }
        Ok(ProbePlan {
            target,
            interval: self.interval,
            timeout: self.timeout,
            failure_threshold: self.failure_threshold,
            success_threshold: self.success_threshold,
            initial_delay: self.initial_delay,
            on_unhealthy,
        })
    }
}

/// `http://HOST[:PORT][/PATH[?QUERY]]`. No user info, no fragment, no `https`.
fn parse_http(url: &str) -> Result<Target, String> {
    let bad = || {
        "`probe.http` must look like http://HOST[:PORT]/PATH, e.g. \
         \"http://127.0.0.1:8080/healthz\" (plain http only)"
            .to_string()
    };
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') || path.contains('#') {
        return Err(bad());
    }
    if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(bad());
    }
    let (host, port) = parse_host_port(authority, Some(80)).ok_or_else(bad)?;
    Ok(Target::Http {
        host,
        port,
        path: path.to_string(),
    })
}

/// `HOST:PORT` (`[V6]:PORT` for an IPv6 address); with a `default` port, `HOST` alone too.
/// The host comes back without brackets.
fn parse_host_port(text: &str, default: Option<u16>) -> Option<(String, u16)> {
    let (host, port) = if let Some(v6) = text.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        match after.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if after.is_empty() => (host, None),
            None => return None,
        }
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0)?,
        None => default?,
    };
    let valid = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'));
    valid.then(|| (host.to_string(), port))
}

/// Connects to the first address of `host:port` that accepts.
async fn connect(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("the name has no address")))
}

/// One `tcp` probe: whether a connection is accepted. The caller bounds it in time.
pub(crate) async fn tcp(host: &str, port: u16) -> bool {
    connect(host, port).await.is_ok()
}

/// One `http` probe: a `GET` with `Connection: close`; success is a status from 200 to 399.
/// Only the status line is read (at most 8 KiB of the answer). The caller bounds it in time.
pub(crate) async fn http(host: &str, port: u16, path: &str) -> bool {
    let Ok(mut stream) = connect(host, port).await else {
        return false;
    };
    let host_header = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: roster-probe\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = head.windows(2).position(|w| w == b"\r\n") {
            return status_is_success(&head[..end]);
        }
        if head.len() >= MAX_STATUS_LINE {
            return false;
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
}

/// Whether an HTTP/1.x status line (`HTTP/1.1 204 No Content`) says 2xx or 3xx.
fn status_is_success(line: &[u8]) -> bool {
    let Ok(line) = std::str::from_utf8(line) else {
        return false;
    };
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    version.starts_with("HTTP/1.")
        && code.len() == 3
        && code
            .parse::<u16>()
            .is_ok_and(|code| (200..400).contains(&code))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(text: &str) -> Probe {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn a_probe_reads_its_keys_with_defaults() {
        let p = probe("tcp = \"127.0.0.1:9\"\ninterval = \"50ms\"\nfailure_threshold = 2");
        let plan = p.plan(OnUnhealthy::Restart).unwrap();
        assert_eq!(
            plan.target,
            Target::Tcp {
                host: "127.0.0.1".into(),
                port: 9
            }
        );
        assert_eq!(plan.interval, Duration::from_millis(50));
        assert_eq!(plan.timeout, Duration::from_secs(1));
        assert_eq!((plan.failure_threshold, plan.success_threshold), (2, 1));
        assert_eq!(plan.initial_delay, Duration::ZERO);
        assert!(toml::from_str::<Probe>("tcp = \"a:1\"\nperiod = \"1s\"").is_err());
    }

    #[test]
    fn http_targets_are_parsed_and_odd_ones_refused() {
        let t = |u: &str| parse_http(u).map(|t| format!("{:?}", parts(&t)));
        assert_eq!(
            t("http://127.0.0.1:8080/healthz?deep=1").unwrap(),
            "(\"127.0.0.1\", 8080, \"/healthz?deep=1\")"
        );
        assert_eq!(t("http://localhost").unwrap(), "(\"localhost\", 80, \"/\")");
        assert_eq!(t("http://[::1]:81/x").unwrap(), "(\"::1\", 81, \"/x\")");
        for bad in [
            "https://127.0.0.1/",
            "127.0.0.2:80",
            "http://user@host/",
            "http://host/a b",
            "http://host:0/",
            "http://host:99999/",
            "http://host/#frag",
            "http:///x",
        ] {
            let e = parse_http(bad).unwrap_err();
            assert!(!e.contains(bad), "the message names no target: {e}");
        }
    }

    fn parts(t: &Target) -> (String, u16, String) {
        match t {
            Target::Http { host, port, path } => (host.clone(), *port, path.clone()),
            _ => panic!("not http"),
        }
    }

    #[test]
    fn a_probe_needs_one_target_and_numbers_within_bounds() {
        let none = probe("interval = \"1s\"");
        assert!(none
            .plan(OnUnhealthy::None)
            .unwrap_err()
            .contains("exactly one"));
        let two = probe("tcp = \"a:1\"\nhttp = \"http://a/\"");
        assert!(two.plan(OnUnhealthy::None).is_err());
        let empty = probe("exec = []");
        assert!(empty.plan(OnUnhealthy::None).unwrap_err().contains("exec"));
        for (key, value) in [
            ("interval", "\"1ms\""),
            ("timeout", "\"0s\""),
            ("initial_delay", "\"2days\""),
            ("failure_threshold", "0"),
            ("success_threshold", "1001"),
        ] {
            let p = probe(&format!("tcp = \"a:1\"\n{key} = {value}"));
            let e = p.plan(OnUnhealthy::None).unwrap_err();
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn debug_never_shows_the_target() {
        let p = probe("exec = [\"/bin/check-secret\", \"--token=abc\"]");
        let plan = p.plan(OnUnhealthy::None).unwrap();
        for text in [format!("{p:?}"), format!("{plan:?}")] {
            assert!(
                !text.contains("check-secret") && !text.contains("abc"),
                "{text}"
            );
        }
        let p = probe("http = \"http://10.1.2.3:8080/secret\"");
        assert!(!format!("{p:?}").contains("10.1.2.3"));
    }

    #[test]
    fn success_is_a_2xx_or_3xx_status() {
        assert!(status_is_success(b"HTTP/1.1 200 OK"));
        assert!(status_is_success(b"HTTP/1.0 302 Found"));
        assert!(status_is_success(b"HTTP/1.1 204"));
        assert!(!status_is_success(b"HTTP/1.1 404 Not Found"));
        assert!(!status_is_success(b"HTTP/1.1 500 Oops"));
        assert!(!status_is_success(b"HTTP/1.1 199 Early"));
        assert!(!status_is_success(b"SSH-2.0-OpenSSH"));
        assert!(!status_is_success(b"HTTP/1.1 2000 OK"));
    }
}
