//! The config table of a `local` runtime.

use std::path::PathBuf;
use std::time::Duration;

use registry_core::{de, ConfigError, Redacted, RuntimeId};
use serde::Deserialize;

/// The shortest `poll_interval` accepted: a rescan is a directory read and a `stat` per
/// descriptor, which a tighter loop would spend a core on.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The table of a `[[runtimes]]` entry with `source = "local"`. Only `spool_dir` is
/// required; an unknown key is an error that names it.
///
/// ```toml
/// [[runtimes]]
/// name = "legacy"
/// source = "local"
/// spool_dir = "/run/legacy-workers"   # where the launcher writes its *.json descriptors
/// grace = "10s"                       # SIGTERM → SIGKILL, unless the stop request says
/// output_retention = "1MiB"           # log bytes kept per worker (bytes, or "512KiB", …)
/// retain_finished = "1h"              # how long an ended worker's record is kept
/// max_workers = 1024                  # worker records at once; more descriptors wait
/// max_descriptor_bytes = "64KiB"      # a larger descriptor is a diagnostic
/// poll_interval = "500ms"             # rescan period (also the fallback when inotify fails)
/// watch = true                        # follow the directory with inotify as well
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// The directory the older launcher writes its descriptors (`*.json`) into. A relative
    /// path is taken from the current directory when the source is built.
    pub spool_dir: Redacted<PathBuf>,
    /// Time between SIGTERM and SIGKILL when stopping, unless the stop request gives one.
    /// Default 10 s.
    #[serde(default = "defaults::grace", deserialize_with = "de::duration")]
    pub grace: Duration,
    /// Output bytes kept per worker (at least; plus at most one chunk of 64 KiB). Default
    /// 1 MiB.
    #[serde(
        default = "defaults::output_retention",
        deserialize_with = "de::byte_size"
    )]
    pub output_retention: u64,
    /// How long an ended worker's record is kept (from its end) before it is removed.
    /// Default 1 h.
    #[serde(
        default = "defaults::retain_finished",
        deserialize_with = "de::duration"
    )]
    pub retain_finished: Duration,
    /// The most worker records at once, live and ended together. Descriptors beyond it wait
    /// (a `too_many_workers` diagnostic says how many) until records go. Default 1024.
    #[serde(default = "defaults::max_workers")]
    pub max_workers: usize,
    /// The largest descriptor file read; a larger one is a `descriptor_too_large`
    /// diagnostic. Default 64 KiB.
    #[serde(
        default = "defaults::max_descriptor_bytes",
        deserialize_with = "de::byte_size"
    )]
    pub max_descriptor_bytes: u64,
    /// How often the spool directory is rescanned whatever inotify says, and how often a
    /// process is looked at in `/proc` where the kernel has no pidfd. Default 500 ms; at
    /// least 10 ms.
    #[serde(default = "defaults::poll_interval", deserialize_with = "de::duration")]
    pub poll_interval: Duration,
    /// Whether to follow the spool directory (and the logs' directories) with inotify, so
    /// that changes are seen at once. `false` leaves only the rescan every
    /// `poll_interval`: for file systems whose changes inotify does not see (NFS, say).
    /// Default `true`.
    #[serde(default = "defaults::watch")]
    pub watch: bool,
}

mod defaults {
    use std::time::Duration;

    pub(super) fn grace() -> Duration {
        Duration::from_secs(10)
    }
    pub(super) fn output_retention() -> u64 {
        1 << 20
    }
    pub(super) fn retain_finished() -> Duration {
        Duration::from_secs(3600)
    }
    pub(super) fn max_workers() -> usize {
        1024
    }
    pub(super) fn max_descriptor_bytes() -> u64 {
        64 << 10
    }
    pub(super) fn poll_interval() -> Duration {
        Duration::from_millis(500)
    }
    pub(super) fn watch() -> bool {
        true
    }
}

impl LocalConfig {
    /// The defaults for a spool directory.
    pub fn new(spool_dir: impl Into<PathBuf>) -> Self {
        LocalConfig {
            spool_dir: spool_dir.into().into(),
            grace: defaults::grace(),
            output_retention: defaults::output_retention(),
            retain_finished: defaults::retain_finished(),
            max_workers: defaults::max_workers(),
            max_descriptor_bytes: defaults::max_descriptor_bytes(),
            poll_interval: defaults::poll_interval(),
            watch: defaults::watch(),
        }
    }

    /// Checks what serde cannot: the message names the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        self.check().map_err(|(_, message)| message)
    }

    /// [`validate`](Self::validate), with the key at fault beside the message.
    fn check(&self) -> Result<(), (&'static str, String)> {
        if self.spool_dir.as_os_str().is_empty() {
            return Err(("spool_dir", "`spool_dir` must not be empty".into()));
        }
        if self.max_workers == 0 {
            return Err(("max_workers", "`max_workers` must be at least 1".into()));
        }
        if self.max_descriptor_bytes == 0 {
            return Err((
                "max_descriptor_bytes",
                "`max_descriptor_bytes` must be at least 1 byte".into(),
            ));
        }
        if self.poll_interval < MIN_POLL_INTERVAL {
            return Err((
                "poll_interval",
                format!(
                    "`poll_interval` must be at least {}ms",
                    MIN_POLL_INTERVAL.as_millis()
                ),
            ));
        }
        Ok(())
    }

    /// Checks the config for runtime `runtime`, as a factory reports it: at the key at fault.
    pub(crate) fn checked(self, runtime: &RuntimeId) -> Result<Self, ConfigError> {
        self.check()
            .map_err(|(key, message)| ConfigError::new(runtime.as_str(), message).at(key))?;
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use registry_core::SourceConfig;

    use super::*;

    fn parse(text: &str) -> Result<LocalConfig, ConfigError> {
        let config = SourceConfig {
            runtime_id: RuntimeId::new("legacy").unwrap(),
            table: text.parse().unwrap(),
            state_dir: PathBuf::from("/nonexistent").into(),
        };
        let runtime = config.runtime_id.clone();
        config.parse::<LocalConfig>()?.checked(&runtime)
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = parse("spool_dir = \"/run/legacy\"").unwrap();
        assert_eq!(c.spool_dir, PathBuf::from("/run/legacy"));
        assert_eq!(c.grace, Duration::from_secs(10));
        assert_eq!(c.output_retention, 1 << 20);
        assert_eq!(c.retain_finished, Duration::from_secs(3600));
        assert_eq!(c.max_workers, 1024);
        assert_eq!(c.max_descriptor_bytes, 64 << 10);
        assert_eq!(c.poll_interval, Duration::from_millis(500));
        assert!(c.watch);
        let by_hand = LocalConfig::new("/run/legacy");
        assert_eq!(format!("{by_hand:?}"), format!("{c:?}"));
    }

    #[test]
    fn every_key_is_read_with_units() {
        let c = parse(
            "spool_dir = \"spool\"\ngrace = \"1500ms\"\noutput_retention = \"4KiB\"\n\
             retain_finished = \"2m\"\nmax_workers = 3\nmax_descriptor_bytes = 100\n\
             poll_interval = \"1s\"\nwatch = false",
        )
        .unwrap();
        assert_eq!(c.grace, Duration::from_millis(1500));
        assert_eq!(c.output_retention, 4096);
        assert_eq!(c.retain_finished, Duration::from_secs(120));
        assert_eq!(c.max_workers, 3);
        assert_eq!(c.max_descriptor_bytes, 100);
        assert_eq!(c.poll_interval, Duration::from_secs(1));
        assert!(!c.watch);
    }

    #[test]
    fn config_errors_name_the_key() {
        let cases = [
            ("grace = \"1s\"", "spool_dir"),
            (
                "spool_dir = \"/x\"\nspool_directory = \"/y\"",
                "spool_directory",
            ),
            ("spool_dir = \"/x\"\ngrace = \"soon\"", "grace"),
            (
                "spool_dir = \"/x\"\noutput_retention = \"lots\"",
                "output_retention",
            ),
            ("spool_dir = \"/x\"\nmax_workers = 0", "max_workers"),
            ("spool_dir = \"/x\"\nmax_workers = -1", "max_workers"),
            (
                "spool_dir = \"/x\"\nmax_descriptor_bytes = 0",
                "max_descriptor_bytes",
            ),
            (
                "spool_dir = \"/x\"\npoll_interval = \"1ms\"",
                "poll_interval",
            ),
            ("spool_dir = \"/x\"\nwatch = \"yes\"", "watch"),
            ("spool_dir = \"\"", "spool_dir"),
        ];
        for (text, key) in cases {
            let err = parse(text).expect_err(text);
            assert!(err.message.contains(key), "{text}: {err}");
            assert_eq!(err.runtime, "legacy");
        }
    }

    #[test]
    fn debug_hides_the_spool_dir() {
        let c = LocalConfig::new("/srv/secret-spool");
        let text = format!("{c:?}");
        assert!(!text.contains("secret-spool"), "{text}");
        assert!(text.contains("max_workers"), "{text}");
    }
}
