//! The runtime's configuration and its spawn profiles: the one deserialized shape of an
//! `embedded` runtime's config table.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::probe::{OnUnhealthy, Probe, ProbePlan};
use crate::restart::{Backoff, Restart, RestartPolicy};
use registry_core::{de, Redacted, RedactedValues};
use serde::Deserialize;

/// Settings of one [`Runtime`](crate::Runtime), and the one copy of them: the `embedded`
/// source reads its `[[runtimes]]` table straight into this struct (every key optional,
/// an unknown key an error that names it), e.g. in TOML:
///
/// ```toml
/// max_workers = 256            # live workers at once
/// max_finished = 1024          # finished records kept; the oldest go first
/// allow_commands = false       # may a spawn give an argv instead of a profile?
/// output_retention = "1MiB"    # output kept per worker (bytes, or "512KiB", …)
/// retain_finished = "1h"       # how long a finished record is kept
/// grace = "10s"                # SIGTERM → SIGKILL, unless the stop or the profile says
/// event_retention = 4096       # the runtime's event ring, in events
/// event_retention_bytes = "16MiB"  # … and in bytes (approximate)
/// max_pending_input = "1MiB"   # stdin bytes that may wait for one worker
/// max_probes = 16              # health probes that may run at once
/// contain = true               # each worker in a cgroup of its own, where cgroup v2 allows
/// # cgroup_root = "/sys/fs/cgroup/roster"   # default: the runtime's own cgroup
/// [profiles.shell]
/// command = ["/bin/sh", "-c"]
/// ```
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
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    #[serde(deserialize_with = "de::byte_size")]
    pub output_retention: u64,
    /// How long a terminal worker record is kept before it is removed. Default 1 h.
    #[serde(deserialize_with = "de::duration")]
    pub retain_finished: Duration,
    /// Time between SIGTERM and SIGKILL when stopping, unless the stop request or the
    /// profile says otherwise. Default 10 s; at most [`MAX_GRACE`](crate::limits::MAX_GRACE).
    #[serde(deserialize_with = "de::duration")]
    pub grace: Duration,
    /// Events kept in the runtime's event ring. Default 4096; must be at least 1.
    pub event_retention: usize,
    /// Approximate bytes the event ring may hold (the strings of each event's worker view plus
    /// a fixed overhead per event); beyond it the oldest events are evicted, as beyond
    /// `event_retention`. The newest event is always kept. Default 16 MiB.
    #[serde(deserialize_with = "de::byte_size")]
    pub event_retention_bytes: u64,
    /// Bytes that may wait in one worker's stdin queue. Default 1 MiB.
    #[serde(deserialize_with = "usize_size")]
    pub max_pending_input: usize,
    /// Health probes of this runtime's workers that may run at once; a probe due while
    /// this many run waits for one to finish. Default 16, 1 to 1024.
    pub max_probes: usize,
    /// Whether each worker runs in a cgroup (v2) of its own, so that stop and the end of a
    /// worker also kill the processes that left its process group (`setsid`). Where cgroup v2
    /// is not writable the runtime runs without and says so (see
    /// [`Runtime::containment`](crate::Runtime::containment)). Default `true`; `false` turns
    /// it off.
    pub contain: bool,
    /// The cgroup (v2) directory under which the runtime makes its own
    /// (`roster-<instance>/w-<n>`). Default: the runtime's own cgroup, found from
    /// `/proc/self/cgroup` on the cgroup2 mount of `/proc/self/mountinfo`.
    pub cgroup_root: Option<Redacted<PathBuf>>,
}

/// A size, as [`de::byte_size`], that fits this machine's `usize`.
fn usize_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = de::byte_size(d)?;
    usize::try_from(n).map_err(|_| serde::de::Error::custom(format!("{n} bytes is too large")))
}

impl RuntimeConfig {
    /// What serde cannot check, with the key path at fault (`profiles.shell.command`) beside
    /// the message: `event_retention` of 0, a profile that fails [`profiles_problem`], a
    /// `max_probes` outside 1..=1024.
    /// [`Runtime::new`](crate::Runtime::new) refuses such a config.
    pub fn problem(&self) -> Result<(), (String, String)> {
        if self.event_retention == 0 {
            return Err((
                "event_retention".into(),
                "event_retention must be at least 1".into(),
            ));
        }
        profiles_problem(&self.profiles)?;
        if !(1..=1024).contains(&self.max_probes) {
            return Err((
                "max_probes".into(),
                "max_probes must be between 1 and 1024".into(),
            ));
        }
        Ok(())
    }
}

/// The checks every profile passes, when the runtime starts and when its profiles are
/// replaced: a command that is not empty, restart and probe keys within bounds (a
/// `max_restarts` over [`MAX_RESTARTS_LIMIT`](crate::MAX_RESTARTS_LIMIT), say). The key path
/// at fault comes beside the message.
pub(crate) fn profiles_problem(
    profiles: &BTreeMap<String, Profile>,
) -> Result<(), (String, String)> {
    for (name, profile) in profiles {
        if !matches!(profile.command.first(), Some(p) if !p.is_empty()) {
            return Err((
                format!("profiles.{name}.command"),
                format!("profile {name:?} has an empty command"),
            ));
        }
        if let Err(e) = profile.probe_plan() {
            return Err((format!("profiles.{name}"), format!("profile {name:?}: {e}")));
        }
    }
    Ok(())
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
            grace: Duration::from_secs(10),
            event_retention: 4096,
            event_retention_bytes: 16 * 1024 * 1024,
            max_pending_input: 1024 * 1024,
            max_probes: 16,
            contain: true,
            cgroup_root: None,
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
/// description = "a shell script, given as the one argument"
/// show_command = true          # the profile list may show the command line
/// cwd = "/srv/jobs"
/// env = { RUST_LOG = "info" }
/// output_retention = 65536
/// grace = "5s"
/// ```
///
/// `Debug` output shows the env keys but never their values, and never the `cwd` path.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The argv prefix, e.g. `["/bin/sh", "-c"]`. Must not be empty.
    pub command: Vec<String>,
    /// A sentence for the people who start workers from this profile ("runs a shell
    /// script given as the one argument"): the runtime's profile list and the web console show
    /// it.
    #[serde(default)]
    pub description: Option<String>,
    /// Whether the runtime's profile list shows `command`. Default `false`: a command line
    /// may name host paths, which clients never see unless the operator says so.
    #[serde(default)]
    pub show_command: bool,
    /// Working directory of the worker; the runtime's own when unset.
    #[serde(default)]
    pub cwd: Option<Redacted<PathBuf>>,
    /// Environment added to the worker's (after the few host variables that pass through,
    /// before the spawn request's own `env`).
    #[serde(default)]
    pub env: RedactedValues<BTreeMap<String, String>>,
    /// Output bytes kept per worker; overrides [`RuntimeConfig::output_retention`].
    /// In config files a number of bytes or a size such as `"4MiB"`.
    #[serde(default, deserialize_with = "de::opt_byte_size")]
    pub output_retention: Option<u64>,
    /// Time between SIGTERM and SIGKILL; overrides [`RuntimeConfig::grace`].
    /// In config files a human duration such as `"10s"` or `"500ms"`.
    #[serde(default, deserialize_with = "de::opt_duration")]
    pub grace: Option<Duration>,
    /// When a worker's process that ended by itself is started again: `"never"` (the
    /// default), `"on-failure"` or `"always"`. See [`Restart`].
    #[serde(default)]
    pub restart: Restart,
    /// The delay before a restart: `{ base = "500ms", cap = "60s", reset_after = "30s" }`
    /// (each key optional). See [`Backoff`].
    #[serde(default)]
    pub restart_backoff: Backoff,
    /// Most restarts within `restart_window`; the exit after them makes the worker `failed`
    /// with reason `crash_loop`. Default 10.
    #[serde(default)]
    pub max_restarts: Option<u32>,
    /// The window `max_restarts` counts in, e.g. `"10m"` (the default).
    #[serde(default, deserialize_with = "de::opt_duration")]
    pub restart_window: Option<Duration>,
    /// How the runtime checks that a running worker is healthy; none by default. See
    /// [`Probe`].
    #[serde(default)]
    pub probe: Option<Probe>,
    /// What happens to a worker its probe found unhealthy: `"none"` (the default) or
    /// `"restart"` (needs a `probe` and a `restart` other than `"never"`). See
    /// [`OnUnhealthy`].
    #[serde(default)]
    pub on_unhealthy: OnUnhealthy,
}

impl Profile {
    /// The restart policy these keys make.
    pub fn restart_policy(&self) -> RestartPolicy {
        let default = RestartPolicy::default();
        RestartPolicy {
            restart: self.restart,
            backoff: self.restart_backoff,
            max_restarts: self.max_restarts.unwrap_or(default.max_restarts),
            window: self.restart_window.unwrap_or(default.window),
        }
    }

    /// Checks the profile's restart and probe keys (the probe's target parsed, the numbers
    /// within bounds) and makes its probe. The message names the key, never a value.
    pub(crate) fn probe_plan(&self) -> Result<Option<ProbePlan>, String> {
        let b = self.restart_backoff;
        registry_core::limits::check_restart(
            &[
                ("restart_backoff.base", Some(b.base)),
                ("restart_backoff.cap", Some(b.cap)),
                ("restart_backoff.reset_after", Some(b.reset_after)),
                ("restart_window", self.restart_window),
            ],
            self.max_restarts,
        )?;
        let plan = self
            .probe
            .as_ref()
            .map(|p| p.plan(self.on_unhealthy))
            .transpose()?;
        if self.on_unhealthy == OnUnhealthy::Restart {
            if plan.is_none() {
                return Err("`on_unhealthy = \"restart\"` needs a `probe`".into());
            }
            check_restarts_unhealthy(self.restart)?;
        }
        Ok(plan)
    }
}

/// `on_unhealthy = "restart"` goes through the restart policy, so the policy must restart.
pub(crate) fn check_restarts_unhealthy(restart: Restart) -> Result<(), String> {
    if restart == Restart::Never {
        return Err(
            "`on_unhealthy = \"restart\"` needs `restart = \"on-failure\"` or \
                    `\"always\"`: a restart caused by the probe goes through the restart policy"
                .into(),
        );
    }
    Ok(())
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
    fn a_profile_reads_its_restart_policy() {
        let p: Profile = toml::from_str(
            r#"
            command = ["/bin/sh", "-c"]
            restart = "on-failure"
            restart_backoff = { base = "100ms", cap = "5s" }
            max_restarts = 3
            restart_window = "1m"
            "#,
        )
        .unwrap();
        let policy = p.restart_policy();
        assert_eq!(policy.restart, Restart::OnFailure);
        assert_eq!(policy.backoff.base, Duration::from_millis(100));
        assert_eq!(policy.backoff.cap, Duration::from_secs(5));
        assert_eq!(policy.backoff.reset_after, Duration::from_secs(30));
        assert_eq!(
            (policy.max_restarts, policy.window),
            (3, Duration::from_secs(60))
        );
        let none: Profile = toml::from_str(r#"command = ["true"]"#).unwrap();
        assert_eq!(none.restart_policy(), RestartPolicy::default());
        assert!(
            toml::from_str::<Profile>("command = [\"true\"]\nrestart = \"sometimes\"").is_err()
        );
        assert!(toml::from_str::<Profile>(
            "command = [\"true\"]\nrestart_backoff = { base = \"1s\", jitter = 1 }"
        )
        .is_err());
    }

    #[test]
    fn unknown_profile_keys_and_bad_durations_are_rejected() {
        assert!(toml::from_str::<Profile>("command = [\"true\"]\nshell = 1").is_err());
        assert!(toml::from_str::<Profile>("command = [\"true\"]\ngrace = \"soon\"").is_err());
    }
}
