//! The config table of a `remote` runtime.

use std::path::PathBuf;
use std::time::Duration;

use registry_core::{de, ConfigError, Redacted, RuntimeId};
use serde::Deserialize;

/// The table of a `[[runtimes]]` entry with `source = "remote"`.
///
/// ```toml
/// [[runtimes]]
/// name = "gpu-box"
/// source = "remote"
/// url = "http://gpu-box.internal:7411"
/// remote_runtime = "local"
/// token_env = "GPU_BOX_TOKEN"
/// ```
/// The URL, the remote runtime's name and where the token comes from are internal authority:
/// they are [`Redacted`], so the derived `Debug` shows only the tuning.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// The other roster's address: `http://host:port` (no path).
    pub url: Redacted<String>,
    /// Which of the other roster's runtimes this runtime is.
    pub remote_runtime: Redacted<String>,
    /// The name of an environment variable holding the bearer token.
    #[serde(default)]
    pub token_env: Option<Redacted<String>>,
    /// A file holding the bearer token (trailing white space is dropped).
    #[serde(default)]
    pub token_file: Option<Redacted<PathBuf>>,
    /// How long a TCP connect may take.
    #[serde(
        default = "defaults::connect_timeout",
        deserialize_with = "de::duration"
    )]
    pub connect_timeout: Duration,
    /// How long a request may take until its whole answer is read.
    #[serde(
        default = "defaults::request_timeout",
        deserialize_with = "de::duration"
    )]
    pub request_timeout: Duration,
    /// How long the event stream may stay silent (the remote pings every 15 s by default)
    /// before the link counts as lost.
    #[serde(
        default = "defaults::heartbeat_timeout",
        deserialize_with = "de::duration"
    )]
    pub heartbeat_timeout: Duration,
    /// The first reconnect delay; each failure doubles it, up to `backoff_cap`.
    #[serde(default = "defaults::backoff_base", deserialize_with = "de::duration")]
    pub backoff_base: Duration,
    /// The longest reconnect delay.
    #[serde(default = "defaults::backoff_cap", deserialize_with = "de::duration")]
    pub backoff_cap: Duration,
    /// The largest single event the remote may send (a `snapshot` of every worker).
    #[serde(
        default = "defaults::max_event_bytes",
        deserialize_with = "de::byte_size"
    )]
    pub max_event_bytes: u64,
    /// How long a worker lost in a restart of the remote stays listed as `failed (lost)`.
    #[serde(default = "defaults::retain_lost", deserialize_with = "de::duration")]
    pub retain_lost: Duration,
}

mod defaults {
    use std::time::Duration;

    pub fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn heartbeat_timeout() -> Duration {
        Duration::from_secs(45)
    }
    pub fn backoff_base() -> Duration {
        Duration::from_millis(100)
    }
    pub fn backoff_cap() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_event_bytes() -> u64 {
        64 << 20
    }
    pub fn retain_lost() -> Duration {
        crate::RETAIN_LOST
    }
}

/// The parts of the URL a request needs.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    /// `host:port`, for the `Host` header and the request target.
    pub authority: Redacted<http::uri::Authority>,
}

/// A config checked and ready: the URL split, the token read.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub endpoint: Endpoint,
    pub remote_runtime: Redacted<String>,
    pub token: Redacted<Option<String>>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub heartbeat_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub max_event_bytes: usize,
}

impl RemoteConfig {
    /// Checks the values and reads the token. Messages are for the operator: they name the
    /// key at fault, never the token.
    pub(crate) fn settings(&self, runtime: &str) -> Result<Settings, ConfigError> {
        let fail = |key: &str, message: String| ConfigError::new(runtime, message).at(key);
        let endpoint = parse_url(&self.url).map_err(|m| fail("url", format!("`url`: {m}")))?;
        if RuntimeId::new(&self.remote_runtime).is_err() {
            return Err(fail(
                "remote_runtime",
                "`remote_runtime` must be a runtime id of the other roster: a lower-case \
                 letter, then up to 62 lower-case letters, digits or '-'"
                    .into(),
            ));
        }
        let token = match (&self.token_env, &self.token_file) {
            (Some(_), Some(_)) => {
                return Err(fail(
                    "token_file",
                    "give `token_env` or `token_file`, not both".into(),
                ))
            }
            (Some(var), None) => Some(std::env::var(var.as_str()).map_err(|_| {
                fail(
                    "token_env",
                    format!(
                        "`token_env`: the environment variable {:?} is not set (or not UTF-8)",
                        var.as_str()
                    ),
                )
            })?),
            (None, Some(path)) => Some(
                std::fs::read_to_string(&**path)
                    .map_err(|e| fail("token_file", format!("`token_file`: cannot read it ({e})")))?
                    .trim_end()
                    .to_string(),
            ),
            (None, None) => None,
        };
        if let Some(token) = &token {
            if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                let key = if self.token_env.is_some() {
                    "token_env"
                } else {
                    "token_file"
                };
                return Err(fail(
                    key,
                    "the token must be non-empty printable ASCII without spaces".into(),
                ));
            }
        }
        let positive = |key: &str, d: Duration| {
            if d.is_zero() {
                Err(fail(key, format!("`{key}` must be longer than zero")))
            } else {
                Ok(())
            }
        };
        positive("connect_timeout", self.connect_timeout)?;
        positive("request_timeout", self.request_timeout)?;
        positive("heartbeat_timeout", self.heartbeat_timeout)?;
        positive("backoff_base", self.backoff_base)?;
        if self.backoff_cap < self.backoff_base {
            return Err(fail(
                "backoff_cap",
                "`backoff_cap` must be at least `backoff_base` (default 100ms)".into(),
            ));
        }
        if self.max_event_bytes < 64 << 10 {
            return Err(fail(
                "max_event_bytes",
                "`max_event_bytes` must be at least 64KiB".into(),
            ));
        }
        Ok(Settings {
            endpoint,
            remote_runtime: self.remote_runtime.clone(),
            token: Redacted(token),
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            heartbeat_timeout: self.heartbeat_timeout,
            backoff_base: self.backoff_base,
            backoff_cap: self.backoff_cap,
            max_event_bytes: usize::try_from(self.max_event_bytes).unwrap_or(usize::MAX),
        })
    }
}

fn parse_url(url: &str) -> Result<Endpoint, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| "not a URL; write e.g. \"http://gpu-box.internal:7411\"".to_string())?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(
                "https is not supported; reach the other roster over plain http on a \
                        trusted network or through a TLS tunnel"
                    .into(),
            )
        }
        _ => return Err("write an http URL such as \"http://gpu-box.internal:7411\"".into()),
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| "the URL has no host".to_string())?;
    if authority.as_str().contains('@') {
        return Err("credentials in the URL are not supported; use `token_env`".into());
    }
    if authority.host().is_empty() {
        return Err("the URL has no host".into());
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err("the URL must have no path or query; roster serves at its root".into());
    }
    let authority = if authority.port().is_some() {
        authority
    } else {
        format!("{}:80", authority.host())
            .parse()
            .map_err(|_| "the URL's host is not valid".to_string())?
    };
    Ok(Endpoint {
        authority: Redacted(authority),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use registry_core::SourceConfig;

    fn table(text: &str) -> SourceConfig {
        SourceConfig {
            runtime_id: RuntimeId::new("far").unwrap(),
            table: text.parse().unwrap(),
            state_dir: PathBuf::from("/nonexistent").into(),
        }
    }

    fn settings(text: &str) -> Result<Settings, ConfigError> {
        table(text).parse::<RemoteConfig>()?.settings("far")
    }

    #[test]
    fn defaults_fill_in() {
        let s = settings("url = \"http://127.0.0.1:7411\"\nremote_runtime = \"local\"").unwrap();
        assert_eq!(s.endpoint.authority.as_str(), "127.0.0.1:7411");
        assert_eq!(s.backoff_cap, Duration::from_secs(30));
        assert_eq!(s.backoff_base, Duration::from_millis(100));
        assert_eq!(s.heartbeat_timeout, Duration::from_secs(45));
        assert!(s.token.is_none());
        let s = settings("url = \"http://box.internal/\"\nremote_runtime = \"a-1\"").unwrap();
        assert_eq!(s.endpoint.authority.as_str(), "box.internal:80");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("url = \"https://x:1\"\nremote_runtime = \"local\"", "https"),
            ("url = \"x y\"\nremote_runtime = \"local\"", "`url`"),
            ("url = \"http://x:1/api\"\nremote_runtime = \"local\"", "no path"),
            ("url = \"http://u:p@x:1\"\nremote_runtime = \"local\"", "credentials"),
            ("url = \"http://x:1\"\nremote_runtime = \"Local\"", "`remote_runtime`"),
            (
                "url = \"http://x:1\"\nremote_runtime = \"l\"\ntoken_env = \"A\"\ntoken_file = \"b\"",
                "not both",
            ),
            (
                "url = \"http://x:1\"\nremote_runtime = \"l\"\ntoken_env = \"ROSTER_TEST_SURELY_UNSET_VAR\"",
                "ROSTER_TEST_SURELY_UNSET_VAR",
            ),
            (
                "url = \"http://x:1\"\nremote_runtime = \"l\"\nbackoff_cap = \"10ms\"",
                "`backoff_cap`",
            ),
            (
                "url = \"http://x:1\"\nremote_runtime = \"l\"\nheartbeat_timeout = \"0s\"",
                "`heartbeat_timeout`",
            ),
            ("url = \"http://x:1\"\nremote_runtime = \"l\"\nurls = 1", "urls"),
        ];
        for (text, needle) in cases {
            let err = settings(text)
                .err()
                .unwrap_or_else(|| panic!("{text} passed"));
            assert!(err.message.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn the_token_comes_from_a_file_and_never_shows_in_debug() {
        let dir = std::env::temp_dir().join(format!("roster-remote-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "s3cret-token-value-1234\n").unwrap();
        let text = format!(
            "url = \"http://10.1.2.3:7411\"\nremote_runtime = \"local\"\ntoken_file = {:?}",
            file.display().to_string()
        );
        let config: RemoteConfig = table(&text).parse().unwrap();
        let s = config.settings("far").unwrap();
        assert_eq!(s.token.as_deref(), Some("s3cret-token-value-1234"));
        let shown = format!("{config:?} {s:?}");
        for secret in ["s3cret", "10.1.2.3", "7411", "roster-remote-cfg"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
