//! The `embedded` runtime's table in the config file: the worker runtime's own
//! [`RuntimeConfig`], read as it is (one struct, no copy).

use worker_runtime::RuntimeConfig;

/// Settings of an `embedded` runtime: the keys of its `[[runtimes]]` table besides `name`
/// and `source`. It is the worker runtime's [`RuntimeConfig`] itself, so a new runtime setting
/// is a config key at once. Every key is optional and defaults to the worker runtime's
/// default; an unknown key is an error that names it.
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
/// contain = true               # each worker in a cgroup (v2) of its own, where writable
/// [runtimes.profiles.shell]
/// command = ["/bin/sh", "-c"]
/// ```
pub type EmbeddedConfig = RuntimeConfig;

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
        let c: EmbeddedConfig = toml::from_str("event_retention_bytes = 4096").unwrap();
        assert_eq!(c.event_retention_bytes, 4096);
    }
}
