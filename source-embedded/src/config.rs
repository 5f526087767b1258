//! The `embedded` runtime's table in the config file.

use std::collections::BTreeMap;
use std::time::Duration;

use registry_core::de;
use serde::Deserialize;
use worker_runtime::{Profile, RuntimeConfig};

/// Settings of an `embedded` runtime: the keys of its `[[runtimes]]` table besides `name`
/// and `source`. Every key is optional and defaults to the worker runtime's default; an
/// unknown key is an error that names it.
///
/// ```toml
/// [[runtimes]]
/// name = "local"
/// source = "embedded"
/// max_workers = 256            # live workers at once
/// max_finished = 1024          # finished records kept; the oldest go first
/// allow_commands = false       # may a spawn give an argv instead of a profile?
/// output_retention = "1MiB"    # output kept per worker (bytes, or "512KiB", …)
/// retain_finished = "1h"       # how long a finished record is kept
/// grace = "10s"                # SIGTERM → SIGKILL, unless the stop or the profile says
/// event_retention = 4096       # the runtime's event ring, in events
/// event_retention_bytes = "16MiB"  # … and in bytes (approximate)
/// max_pending_input = "1MiB"   # stdin bytes that may wait for one worker
/// [runtimes.profiles.shell]
/// command = ["/bin/sh", "-c"]
/// ```
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// Live (non-terminal) workers allowed at once. Default 256.
    pub max_workers: usize,
    /// Finished worker records kept; beyond it the oldest is removed. Default 1024.
    pub max_finished: usize,
    /// Whether a spawn may give a `command` in place of a profile. Default `false`.
    pub allow_commands: bool,
    /// Spawn templates by name (`command`, `cwd`, `env`, `output_retention`, `grace`).
    pub profiles: BTreeMap<String, Profile>,
    /// Output bytes kept per worker. Default 1 MiB.
    #[serde(deserialize_with = "de::byte_size")]
    pub output_retention: u64,
    /// How long a finished worker record is kept. Default 1 h.
    #[serde(deserialize_with = "de::duration")]
    pub retain_finished: Duration,
    /// Time between SIGTERM and SIGKILL when stopping, unless the stop request or the
    /// profile gives one. Default 10 s.
    #[serde(deserialize_with = "de::duration")]
    pub grace: Duration,
    /// Events kept in the runtime's event ring (at least 1). Default 4096.
    pub event_retention: usize,
    /// Approximate bytes the runtime's event ring may hold; the oldest events go first.
    /// Default 16 MiB.
    #[serde(deserialize_with = "de::byte_size")]
    pub event_retention_bytes: u64,
    /// Bytes of input that may wait for one worker's stdin. Default 1 MiB.
    #[serde(deserialize_with = "de::byte_size")]
    pub max_pending_input: u64,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        let d = RuntimeConfig::default();
        EmbeddedConfig {
            max_workers: d.max_workers,
            max_finished: d.max_finished,
            allow_commands: d.allow_commands,
            profiles: d.profiles,
            output_retention: d.output_retention,
            retain_finished: d.retain_finished,
            grace: d.default_grace,
            event_retention: d.event_retention,
            event_retention_bytes: d.event_retention_bytes,
            max_pending_input: d.max_pending_input as u64,
        }
    }
}

impl EmbeddedConfig {
    /// The worker runtime's config for these settings.
    pub fn runtime_config(&self) -> RuntimeConfig {
        RuntimeConfig {
            max_workers: self.max_workers,
            max_finished: self.max_finished,
            allow_commands: self.allow_commands,
            profiles: self.profiles.clone(),
            output_retention: self.output_retention,
            retain_finished: self.retain_finished,
            default_grace: self.grace,
            event_retention: self.event_retention,
            event_retention_bytes: self.event_retention_bytes,
            max_pending_input: usize::try_from(self.max_pending_input).unwrap_or(usize::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let c = EmbeddedConfig::default();
        assert_eq!(c.output_retention, 1 << 20);
        assert_eq!(c.retain_finished, Duration::from_secs(3600));
        assert_eq!(c.grace, Duration::from_secs(10));
        assert_eq!(c.max_workers, 256);
        assert_eq!(c.event_retention_bytes, 16 << 20);
        assert!(!c.allow_commands);
        assert!(c.profiles.is_empty());
    }

    #[test]
    fn event_retention_bytes_reads_as_a_byte_size() {
        let c: EmbeddedConfig = toml::from_str("event_retention_bytes = \"2MiB\"").unwrap();
        assert_eq!(c.event_retention_bytes, 2 << 20);
        assert_eq!(c.runtime_config().event_retention_bytes, 2 << 20);
        let c: EmbeddedConfig = toml::from_str("event_retention_bytes = 4096").unwrap();
        assert_eq!(c.event_retention_bytes, 4096);
    }

    #[test]
    fn runtime_config_carries_every_setting() {
        let c = EmbeddedConfig {
            max_workers: 3,
            max_finished: 4,
            allow_commands: true,
            profiles: BTreeMap::from([(
                "shell".to_string(),
                Profile {
                    command: vec!["/bin/sh".into(), "-c".into()],
                    ..Default::default()
                },
            )]),
            output_retention: 5,
            retain_finished: Duration::from_secs(6),
            grace: Duration::from_secs(7),
            event_retention: 8,
            event_retention_bytes: 10,
            max_pending_input: 9,
        };
        let r = c.runtime_config();
        assert_eq!(
            (
                r.max_workers,
                r.max_finished,
                r.allow_commands,
                r.output_retention
            ),
            (3, 4, true, 5)
        );
        assert_eq!(r.retain_finished, Duration::from_secs(6));
        assert_eq!(r.default_grace, Duration::from_secs(7));
        assert_eq!(
            (
                r.event_retention,
                r.event_retention_bytes,
                r.max_pending_input
            ),
            (8, 10, 9)
        );
        assert_eq!(r.profiles, c.profiles);
    }
}
