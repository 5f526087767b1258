//! Runtime configuration and spawn profiles.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use registry_core::Redacted;
use serde::{Deserialize, Deserializer};

/// Settings of one [`Runtime`](crate::Runtime).
///
/// `Default` gives the documented defaults; set the fields you need with struct update syntax:
///
/// ```
/// let config = worker_runtime::RuntimeConfig {
///     max_workers: 16,
///     allow_commands: true,
///     ..Default::default()
/// };
/// assert_eq!(config.output_retention, 1024 * 1024);
/// ```
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Live (non-terminal) workers allowed at once; a spawn beyond it is
    /// [`RuntimeError::CapacityExceeded`](crate::RuntimeError::CapacityExceeded). Default 256.
    pub max_workers: usize,
    /// Terminal worker records kept; beyond it the oldest finished record is removed first
    /// (with a [`RuntimeEvent::Removed`](crate::RuntimeEvent::Removed)). Default 1024.
    pub max_finished: usize,
    /// Whether a spawn may name an argv `command` instead of a profile. Default `false`.
    pub allow_commands: bool,
    /// The spawn templates, by name.
    pub profiles: BTreeMap<String, Profile>,
    /// Output bytes kept per worker (at least this many of the newest bytes). Default 1 MiB.
    pub output_retention: u64,
    /// How long a terminal worker record is kept before it is removed. Default 1 h.
    pub retain_finished: Duration,
    /// Time between SIGTERM and SIGKILL when stopping, unless the stop request or the
    /// profile says otherwise. Default 10 s; at most [`MAX_GRACE`](crate::limits::MAX_GRACE).
    pub default_grace: Duration,
    /// Events kept in the runtime's event ring. Default 4096; must be at least 1.
    pub event_retention: usize,
    /// Approximate bytes the event ring may hold (the strings of each event's worker view plus
    /// a fixed overhead per event); beyond it the oldest events are evicted, as beyond
    /// `event_retention`. The newest event is always kept. Default 16 MiB.
    pub event_retention_bytes: u64,
    /// Bytes that may wait in one worker's stdin queue. Default 1 MiB.
    pub max_pending_input: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_workers: 256,
            max_finished: 1024,
            allow_commands: false,
            profiles: BTreeMap::new(),
            output_retention: 1024 * 1024,
            retain_finished: Duration::from_secs(3600),
            default_grace: Duration::from_secs(10),
            event_retention: 4096,
            event_retention_bytes: 16 * 1024 * 1024,
            max_pending_input: 1024 * 1024,
        }
    }
}

/// A spawn template: what to run and how.
///
/// The worker's argv is `command` followed by the spawn request's `args`. Profiles come from
/// the operator's config file (serde, unknown keys rejected), e.g. in TOML:
///
/// ```toml
/// command = ["/bin/sh", "-c"]
/// cwd = "/srv/jobs"
/// env = { RUST_LOG = "info" }
/// output_retention = 65536
/// grace = "5s"
/// ```
///
/// `Debug` output shows the env keys but never their values, and never the `cwd` path.
#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The argv prefix, e.g. `["/bin/sh", "-c"]`. Must not be empty.
    pub command: Vec<String>,
    /// Working directory of the worker; the runtime's own when unset.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Environment added to the worker's (after the few host variables that pass through,
    /// before the spawn request's own `env`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Output bytes kept per worker; overrides [`RuntimeConfig::output_retention`].
    /// In config files a number of bytes or a size such as `"4MiB"`.
    #[serde(default, deserialize_with = "deserialize_opt_size")]
    pub output_retention: Option<u64>,
    /// Time between SIGTERM and SIGKILL; overrides [`RuntimeConfig::default_grace`].
    /// In config files a human duration such as `"10s"` or `"500ms"`.
    #[serde(default, deserialize_with = "deserialize_opt_duration")]
    pub grace: Option<Duration>,
}

impl fmt::Debug for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Profile")
            .field("command", &self.command)
            .field("cwd", &self.cwd.as_ref().map(|_| Redacted(())))
            .field("env", &RedactedMap(&self.env))
            .field("output_retention", &self.output_retention)
            .field("grace", &self.grace)
            .finish()
    }
}

/// Prints a map's keys with redacted values.
pub(crate) struct RedactedMap<'a>(pub(crate) &'a BTreeMap<String, String>);

impl fmt::Debug for RedactedMap<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, Redacted(()))))
            .finish()
    }
}

fn deserialize_opt_duration<'de, D>(deserializer: D) -> Result<Option<Duration>, D::Error>
where
    D: Deserializer<'de>,
{
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))
}

/// A size: bytes as a number, or a string with a unit (B, kB, KiB, MB, MiB, GB, GiB).
///
/// The registry's config helpers read sizes the same way; this crate keeps its own copy so
/// that it depends on no registry crate.
fn deserialize_opt_size<'de, D>(deserializer: D) -> Result<Option<u64>, D::Error>
where
    D: Deserializer<'de>,
{
    struct Size;
    impl serde::de::Visitor<'_> for Size {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a size: bytes as a whole number, or a string such as \"4MiB\"")
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<u64, E> {
            Ok(n)
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<u64, E> {
            u64::try_from(n)
                .map_err(|_| E::custom(format!("{n} is not a size: a size is not negative")))
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<u64, E> {
            let t = text.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (num, unit) = t.split_at(split);
            let mult: Option<u64> = match unit.trim().to_ascii_lowercase().as_str() {
                "" | "b" => Some(1),
                "kb" => Some(1_000),
                "kib" => Some(1 << 10),
                "mb" => Some(1_000_000),
                "mib" => Some(1 << 20),
                "gb" => Some(1_000_000_000),
                "gib" => Some(1 << 30),
                _ => None,
            };
            num.parse::<u64>()
                .ok()
                .zip(mult)
                .and_then(|(n, m)| n.checked_mul(m))
                .ok_or_else(|| {
                    E::custom(format!(
                        "{text:?} is not a size; write bytes as a number, or e.g. \"4MiB\""
                    ))
                })
        }
    }
    deserializer.deserialize_any(Size).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_reads_its_output_retention_as_a_size() {
        let p: Profile =
            toml::from_str("command = [\"/bin/sh\"]\noutput_retention = \"4MiB\"").unwrap();
        assert_eq!(p.output_retention, Some(4 << 20));
        let p: Profile =
            toml::from_str("command = [\"/bin/sh\"]\noutput_retention = 4096").unwrap();
        assert_eq!(p.output_retention, Some(4096));
        let e = toml::from_str::<Profile>("command = [\"/bin/sh\"]\noutput_retention = \"lots\"")
            .unwrap_err();
        assert!(e.to_string().contains("not a size"), "{e}");
        let e = toml::from_str::<Profile>("command = [\"/bin/sh\"]\noutput_retention = -1")
            .unwrap_err();
        assert!(e.to_string().contains("negative"), "{e}");
    }

    #[test]
    fn a_profile_reads_from_config_with_a_human_grace() {
        let profile: Profile = toml::from_str(
            r#"
            command = ["/bin/sh", "-c"]
            cwd = "/tmp"
            env = { A = "1" }
            output_retention = 4096
            grace = "1500ms"
            "#,
        )
        .unwrap();
        assert_eq!(profile.command, ["/bin/sh", "-c"]);
        assert_eq!(profile.grace, Some(Duration::from_millis(1500)));
        assert_eq!(profile.output_retention, Some(4096));
        assert_eq!(profile.env.get("A").map(String::as_str), Some("1"));

        let minimal: Profile = toml::from_str(r#"command = ["true"]"#).unwrap();
        assert_eq!(minimal.grace, None);
        assert!(minimal.env.is_empty() && minimal.cwd.is_none());
    }

    #[test]
    fn unknown_profile_keys_and_bad_durations_are_rejected() {
        assert!(toml::from_str::<Profile>("command = [\"true\"]\nshell = 1").is_err());
        assert!(toml::from_str::<Profile>("command = [\"true\"]\ngrace = \"soon\"").is_err());
    }
}
