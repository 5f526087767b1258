//! Workers, runtimes and their public views.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{Redacted, RedactedValues, RegistryError, RuntimeId, SourceKey, WorkerId};

/// A worker's state (SPEC §2). `exited`, `stopped` and `failed` are terminal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Created, not yet running.
    Starting,
    /// Running.
    Running,
    /// A stop was asked for and is under way.
    Stopping,
    /// Ended by itself, with `exit_code`.
    Exited,
    /// Ended on request.
    Stopped,
    /// Ended otherwise, with `reason`.
    Failed,
    /// The source lost contact; `last_seen_at` says when it last knew.
    Unknown,
}

impl WorkerState {
    /// Every state, in order.
    pub const ALL: [WorkerState; 7] = [
        WorkerState::Starting,
        WorkerState::Running,
        WorkerState::Stopping,
        WorkerState::Exited,
        WorkerState::Stopped,
        WorkerState::Failed,
        WorkerState::Unknown,
    ];

    /// Whether the state never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            WorkerState::Exited | WorkerState::Stopped | WorkerState::Failed
        )
    }

    /// Where the state stands in the lifecycle `starting → running → stopping →
    /// exited | stopped | failed`: 0 to 3, the terminal states alike. `None` for `unknown`,
    /// which stands outside that order (any live state may become it and come back).
    pub fn progress(self) -> Option<u8> {
        match self {
            WorkerState::Starting => Some(0),
            WorkerState::Running => Some(1),
            WorkerState::Stopping => Some(2),
            WorkerState::Exited | WorkerState::Stopped | WorkerState::Failed => Some(3),
            WorkerState::Unknown => None,
        }
    }

    /// The state-order rule: whether a worker whose furthest state so far is `self` may next
    /// be reported in `next`. A terminal state never changes again; a live state moves
    /// forward (or stays), never back; `unknown` may come between any two live states.
    pub fn may_become(self, next: WorkerState) -> bool {
        if self.is_terminal() {
            return false;
        }
        match (self.progress(), next.progress()) {
            (Some(now), Some(then)) => then >= now,
            _ => true,
        }
    }

    /// The state-order rule across restarts: `runs` and `next_runs` count the restarts a
    /// worker had by each report. A higher count is a new run of the same worker, which starts
    /// over (at `starting`); within a run [`may_become`](Self::may_become) holds. A terminal
    /// worker never changes again, and the count never goes back.
    pub fn may_become_across_runs(self, runs: u32, next: WorkerState, next_runs: u32) -> bool {
        if self.is_terminal() || next_runs < runs {
            return false;
        }
        next_runs > runs || self.may_become(next)
    }

    /// The wire name (`running`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Running => "running",
            WorkerState::Stopping => "stopping",
            WorkerState::Exited => "exited",
            WorkerState::Stopped => "stopped",
            WorkerState::Failed => "failed",
            WorkerState::Unknown => "unknown",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Result<Self, RegistryError> {
        WorkerState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                RegistryError::InvalidRequest(format!(
                    "unknown state {:?}; states are starting, running, stopping, exited, \
                     stopped, failed, unknown",
                    s.chars().take(40).collect::<String>()
                ))
            })
    }
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a worker `failed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailReason {
    /// The process could not be started.
    SpawnFailed,
    /// A signal nobody asked the registry for ended it.
    Killed,
    /// The source lost it for good.
    Lost,
    /// Its restart policy gave up: it was restarted `max_restarts` times within the
    /// restart window and ended once more.
    CrashLoop,
}

impl FailReason {
    /// The wire name (`spawn_failed`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::SpawnFailed => "spawn_failed",
            FailReason::Killed => "killed",
            FailReason::Lost => "lost",
            FailReason::CrashLoop => "crash_loop",
        }
    }
}

/// Which output stream a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamKind {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// What a source knows of one of its workers. Holds the source key, so it is not `Serialize`.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceWorker {
    /// The source's handle (internal authority).
    pub key: SourceKey,
    /// Client-given name, not unique.
    pub name: Option<String>,
    /// Client-given labels.
    pub labels: BTreeMap<String, String>,
    /// Current state.
    pub state: WorkerState,
    /// Exit code, once `exited` (and for `stopped` when the process exited by itself).
    pub exit_code: Option<i32>,
    /// Why, once `failed`.
    pub reason: Option<FailReason>,
    /// When the record was created.
    pub created_at: OffsetDateTime,
    /// When the process started.
    pub started_at: Option<OffsetDateTime>,
    /// When it became terminal.
    pub ended_at: Option<OffsetDateTime>,
    /// When the source last had word of it (set for `unknown`).
    pub last_seen_at: Option<OffsetDateTime>,
    /// The profile the client asked for.
    pub profile: Option<String>,
    /// The arguments given to the profile or command.
    pub args: Vec<String>,
    /// The argv the client asked for in place of a profile.
    pub command: Option<Vec<String>>,
    /// How often a restart policy started the worker again (0 where there is none).
    pub restarts: u32,
    /// How the previous run ended, once the worker was restarted.
    pub last_exit: Option<LastExit>,
    /// While the worker waits to be restarted (as `starting`): when the next run is due.
    pub retry_at: Option<OffsetDateTime>,
    /// Why the worker failed (or what else about its end a person should know), in words:
    /// "program not found: No such file or directory (os error 2)". Written for the client
    /// who asked for the worker: no host path, pid or environment value (the registry
    /// scrubs it again).
    pub message: Option<String>,
    /// What the worker's health probe says; `None` without a probe.
    pub health: Option<WorkerHealth>,
}

/// A worker's health as its probe sees it (`health` of a worker view; absent without a
/// probe).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerHealth {
    /// `unknown` until the probe decided (and again at each new run), then `healthy` or
    /// `unhealthy`.
    pub status: HealthState,
    /// Since when `status` holds.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// The probe's kind. Never its target or command line: those are the operator's config.
    pub probe: ProbeKind,
}

/// What a worker's health probe concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// Not decided yet: the run is new, or too few probes have answered.
    Unknown,
    /// `success_threshold` probes in a row succeeded.
    Healthy,
    /// `failure_threshold` probes in a row failed.
    Unhealthy,
}

impl HealthState {
    /// Every health state, in order.
    pub const ALL: [HealthState; 3] = [
        HealthState::Unknown,
        HealthState::Healthy,
        HealthState::Unhealthy,
    ];

    /// The wire name (`healthy`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Unknown => "unknown",
            HealthState::Healthy => "healthy",
            HealthState::Unhealthy => "unhealthy",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Result<Self, RegistryError> {
        HealthState::ALL
            .into_iter()
            .find(|h| h.as_str() == s)
            .ok_or_else(|| {
                RegistryError::InvalidRequest(format!(
                    "unknown health {:?}; health is unknown, healthy or unhealthy",
                    s.chars().take(40).collect::<String>()
                ))
            })
    }
}

/// The kind of a worker's health probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeKind {
    /// A command run on the host; exit code 0 is a success.
    Exec,
    /// An HTTP `GET`; a 2xx or 3xx answer is a success.
    Http,
    /// A TCP connect; an accepted connection is a success.
    Tcp,
}

/// How the previous run of a restarted worker ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LastExit {
    /// The exit code, when the process exited by itself.
    pub code: Option<i32>,
    /// `killed` when a signal nobody asked for ended it.
    pub reason: Option<FailReason>,
    /// When it ended.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// A worker as clients see it (SPEC §2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerView {
    /// Registry-issued id.
    pub id: WorkerId,
    /// The runtime it belongs to.
    pub runtime_id: RuntimeId,
    /// Client-given name.
    pub name: Option<String>,
    /// Client-given labels.
    pub labels: BTreeMap<String, String>,
    /// Current state.
    pub state: WorkerState,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Why it failed.
    pub reason: Option<FailReason>,
    /// When the record was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When the process started.
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    /// When it became terminal.
    #[serde(with = "time::serde::rfc3339::option")]
    pub ended_at: Option<OffsetDateTime>,
    /// When the source last had word of it.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_seen_at: Option<OffsetDateTime>,
    /// The profile asked for.
    pub profile: Option<String>,
    /// Arguments to the profile or command.
    pub args: Vec<String>,
    /// The argv asked for in place of a profile.
    pub command: Option<Vec<String>>,
    /// How often a restart policy started the worker again. Absent from an older roster's
    /// answer, and then 0.
    #[serde(default)]
    pub restarts: u32,
    /// How the previous run ended, once the worker was restarted.
    #[serde(default)]
    pub last_exit: Option<LastExit>,
    /// While the worker waits to be restarted (as `starting`): when the next run is due.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub retry_at: Option<OffsetDateTime>,
    /// Why it failed, in words (sanitized): set when it could not be started, say. Absent
    /// from an older roster's answer, and then `None`.
    #[serde(default)]
    pub message: Option<String>,
    /// What the worker's health probe says; absent without a probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<WorkerHealth>,
}

impl WorkerView {
    /// The public view of `worker`, under the id the registry issued for it.
    pub fn from_source(id: WorkerId, runtime_id: RuntimeId, worker: &SourceWorker) -> Self {
        WorkerView {
            id,
            runtime_id,
            name: worker.name.clone(),
            labels: worker.labels.clone(),
            state: worker.state,
            exit_code: worker.exit_code,
            reason: worker.reason,
            created_at: worker.created_at,
            started_at: worker.started_at,
            ended_at: worker.ended_at,
            last_seen_at: worker.last_seen_at,
            profile: worker.profile.clone(),
            args: worker.args.clone(),
            command: worker.command.clone(),
            restarts: worker.restarts,
            last_exit: worker.last_exit,
            retry_at: worker.retry_at,
            message: worker.message.as_deref().map(crate::sanitize_message),
            health: worker.health,
        }
    }
}

/// What a source can do. Data, not guesses: the registry refuses an operation whose
/// capability is false with `unsupported`, and the conformance suite picks its tests by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// Can start workers.
    pub spawn: bool,
    /// Can write to a worker's stdin.
    pub input: bool,
    /// Can stop workers.
    pub stop: bool,
    /// Can stream a worker's output.
    pub output: bool,
    /// Can remove a terminal worker's record on request.
    pub remove: bool,
    /// Honours a restart policy given in a spawn request (`restart`, `restart_backoff`,
    /// `max_restarts`, `restart_window`). Where false, a request that gives one is
    /// `unsupported`. Absent from an older roster's answer, and then false.
    #[serde(default)]
    pub restart: bool,
}

impl Capabilities {
    /// Everything.
    pub const ALL: Capabilities = Capabilities {
        spawn: true,
        input: true,
        stop: true,
        output: true,
        remove: true,
        restart: true,
    };
}

/// How well a runtime answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Answers, no problems.
    Ready,
    /// Answers, with problems (see `message` and diagnostics).
    Degraded,
    /// Does not answer.
    Unavailable,
}

/// A problem a source wants an operator to see (a malformed descriptor, …).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Diagnostic {
    /// A stable machine-readable code, e.g. `descriptor_malformed`.
    pub code: String,
    /// A sentence for a person, with no internal authority.
    pub message: String,
}

/// Health as a source reports it.
#[derive(Clone, PartialEq)]
pub struct SourceHealth {
    /// The status.
    pub status: HealthStatus,
    /// An explanation for anything but `ready`. The registry sanitizes it.
    pub message: Option<String>,
    /// When the source will try again, while `unavailable`.
    pub retry_at: Option<OffsetDateTime>,
    /// Current problems. The registry sanitizes their messages.
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Debug for Diagnostic {
    // Scrubbed: a source's message may name paths before the registry sanitizes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Diagnostic")
            .field("code", &crate::sanitize_message(&self.code))
            .field("message", &crate::sanitize_message(&self.message))
            .finish()
    }
}

impl fmt::Debug for SourceHealth {
    // Scrubbed like `Diagnostic`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceHealth")
            .field("status", &self.status)
            .field(
                "message",
                &self.message.as_deref().map(crate::sanitize_message),
            )
            .field("retry_at", &self.retry_at)
            .field("diagnostics", &self.diagnostics)
            .finish()
    }
}

impl SourceHealth {
    /// `ready`, no message, no diagnostics.
    pub fn ready() -> Self {
        SourceHealth {
            status: HealthStatus::Ready,
            message: None,
            retry_at: None,
            diagnostics: Vec::new(),
        }
    }

    /// `unavailable` with a message.
    pub fn unavailable(message: impl Into<String>, retry_at: Option<OffsetDateTime>) -> Self {
        SourceHealth {
            status: HealthStatus::Unavailable,
            message: Some(message.into()),
            retry_at,
            diagnostics: Vec::new(),
        }
    }
}

/// A runtime's health as clients see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthView {
    /// The status.
    pub status: HealthStatus,
    /// Since when the status holds.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// When the source will try again (while `unavailable`).
    #[serde(with = "time::serde::rfc3339::option")]
    pub retry_at: Option<OffsetDateTime>,
    /// A sanitized explanation.
    pub message: Option<String>,
}

/// A runtime as clients see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeView {
    /// The config name.
    pub id: RuntimeId,
    /// The source kind (`embedded`, `remote`, `local`, …).
    pub kind: String,
    /// Health.
    pub health: HealthView,
    /// What its source can do.
    pub capabilities: Capabilities,
    /// Worker counts by state; every state is present.
    pub workers: BTreeMap<WorkerState, u64>,
    /// Current problems.
    pub diagnostics: Vec<Diagnostic>,
}

/// A spawn profile of a runtime as clients see it (`GET /v1/runtimes/{id}/profiles`): a
/// name a spawn request may give as `profile`, and what such a request may pass. It never
/// holds the profile's environment (names or values) or working directory, and holds its
/// command line only where the runtime's config shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileView {
    /// The name to give as `profile`.
    pub name: String,
    /// The operator's sentence about it, if the config has one.
    #[serde(default)]
    pub description: Option<String>,
    /// The fields of a spawn request this profile takes besides `profile` (`args`, `env`,
    /// `stdin`, `name`, `labels`, `request_id`).
    pub accepts: Vec<String>,
    /// What becomes of the request's `args`.
    pub args: ArgsRule,
    /// The profile's restart policy; `None` when its workers are never restarted.
    #[serde(default)]
    pub restart: Option<RestartView>,
    /// The grace between SIGTERM and SIGKILL of a stop that gives none, in milliseconds.
    #[serde(default)]
    pub grace_ms: Option<u64>,
    /// The command line the request's `args` are appended to — only where the config shows it
    /// (it may name host paths); otherwise `None`.
    #[serde(default)]
    pub command: Option<Vec<String>>,
}

impl ProfileView {
    /// Every field of a spawn request besides `profile` and `command`: what a profile of a
    /// kind that takes the whole request (`embedded`, `tmux`) accepts.
    pub const EVERY_FIELD: [&'static str; 6] =
        ["args", "env", "stdin", "name", "labels", "request_id"];
}

/// What a profile does with a spawn request's `args`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArgsRule {
    /// Appended to the profile's command line, any number (within the request limits).
    Appended,
}

/// A profile's restart policy, as clients see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartView {
    /// `on-failure` or `always`.
    pub policy: String,
    /// Most restarts within the window; the exit after them ends the worker `crash_loop`.
    pub max_restarts: u32,
    /// The window `max_restarts` counts in, in milliseconds.
    pub window_ms: u64,
}

/// A spawn request (SPEC §3). Unknown fields are refused when it is parsed. `Debug` shows
/// the environment's names, never its values, and never the stdin text.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnRequest {
    /// A template from the runtime's config.
    #[serde(default)]
    pub profile: Option<String>,
    /// An argv, in place of a profile, where the runtime allows commands.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Arguments appended to the profile's or the command's argv.
    #[serde(default, deserialize_with = "crate::de::null_default")]
    pub args: Vec<String>,
    /// Environment added to the profile's. Never shown anywhere.
    #[serde(default, deserialize_with = "crate::de::null_default")]
    pub env: RedactedValues<BTreeMap<String, String>>,
    /// A name for people; not unique.
    #[serde(default)]
    pub name: Option<String>,
    /// Labels to filter by.
    #[serde(default, deserialize_with = "crate::de::null_default")]
    pub labels: BTreeMap<String, String>,
    /// Text written to stdin right after start.
    #[serde(default, serialize_with = "crate::redact::serialize_revealed")]
    pub stdin: Option<Redacted<String>>,
    /// Makes the call idempotent.
    #[serde(default)]
    pub request_id: Option<String>,
    /// When the worker's process is started again, overriding the profile's `restart`.
    /// Only where the runtime's `restart` capability is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<Restart>,
    /// The delay before a restart, overriding each of the profile's keys that it gives.
    #[serde(
        default,
        deserialize_with = "crate::de::opt_table",
        skip_serializing_if = "Option::is_none"
    )]
    pub restart_backoff: Option<BackoffRequest>,
    /// Most restarts within the window, overriding the profile's `max_restarts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restarts: Option<u32>,
    /// The window `max_restarts` counts in, e.g. `"10m"`, overriding the profile's.
    #[serde(
        default,
        deserialize_with = "crate::de::opt_duration",
        serialize_with = "ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub restart_window: Option<Duration>,
}

/// When a worker whose process ended by itself is started again: a profile's or a spawn
/// request's `restart`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    /// Never: the worker ends with its process. The default.
    #[default]
    Never,
    /// When the process exited with a code other than 0 or was killed by a signal nobody
    /// asked for.
    OnFailure,
    /// Whenever the process ended by itself, also with code 0.
    Always,
}

/// A spawn request's `restart_backoff`: `{"base": "500ms", "cap": "60s", "reset_after":
/// "30s"}`, each key optional; a key given overrides the profile's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffRequest {
    /// The bound of the first delay.
    #[serde(
        default,
        deserialize_with = "crate::de::opt_duration",
        serialize_with = "ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub base: Option<Duration>,
    /// The largest bound.
    #[serde(
        default,
        deserialize_with = "crate::de::opt_duration",
        serialize_with = "ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub cap: Option<Duration>,
    /// A run that lasted this long resets the delay to its first bound.
    #[serde(
        default,
        deserialize_with = "crate::de::opt_duration",
        serialize_with = "ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub reset_after: Option<Duration>,
}

/// Writes a duration as the config files and requests read it (`"1s 500ms"`).
fn ser_opt_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
        None => s.serialize_none(),
    }
}

/// Limits on a spawn request's fields and on a stop's grace period: the one copy every source
/// and the server use.
pub mod limits {
    /// Longest name, label key or value, request id, profile name, in characters (as the
    /// document's `maxLength` counts), so at most four times as many bytes.
    pub const MAX_SHORT_TEXT: usize = 256;
    /// Most labels.
    pub const MAX_LABELS: usize = 64;
    /// Most argv entries (command + args).
    pub const MAX_ARGS: usize = 4096;
    /// Most environment entries.
    pub const MAX_ENV: usize = 1024;
    /// Longest single argv entry (the kernel's own limit per string).
    pub const MAX_ARG_BYTES: usize = 128 << 10;
    /// Most bytes of command, args and environment (names and values) together.
    pub const MAX_ARGV_BYTES: usize = 256 << 10;
    /// Longest initial `stdin`.
    pub const MAX_STDIN_BYTES: usize = 1 << 20;
    /// Longest grace period between SIGTERM and SIGKILL: one day. A longer one (from a stop,
    /// a profile or the config) is cut to this by the sources, and refused by the HTTP API.
    pub const MAX_GRACE: std::time::Duration = std::time::Duration::from_secs(24 * 60 * 60);
    /// Most restarts a restart policy may allow within its window (a profile's or a spawn
    /// request's `max_restarts`): it bounds the memory of the window.
    pub const MAX_RESTARTS: u32 = 10_000;
    /// Longest duration of a restart policy (`restart_backoff`'s keys, `restart_window`):
    /// one day.
    pub const MAX_RESTART_DURATION: std::time::Duration = MAX_GRACE;

    /// Checks a restart policy's numbers against these bounds (the one check for profiles
    /// and spawn requests). The message names the key at fault.
    pub fn check_restart(
        durations: &[(&str, Option<std::time::Duration>)],
        max_restarts: Option<u32>,
    ) -> Result<(), String> {
        if max_restarts.is_some_and(|n| n > MAX_RESTARTS) {
            return Err(format!("`max_restarts` is at most {MAX_RESTARTS}"));
        }
        for (key, d) in durations {
            if d.is_some_and(|d| d > MAX_RESTART_DURATION) {
                return Err(format!("`{key}` is at most a day"));
            }
        }
        Ok(())
    }
}

impl SpawnRequest {
    /// Checks the request's shape: exactly one of `profile` and `command`, a non-empty
    /// command, no NUL bytes, environment names without `=`, and the limits of [`limits`].
    /// The message names the field at fault.
    pub fn validate(&self) -> Result<(), RegistryError> {
        use limits::*;
        let invalid = |m: String| Err(RegistryError::InvalidRequest(m));
        match (&self.profile, &self.command) {
            (Some(_), Some(_)) => {
                return invalid("give either `profile` or `command`, not both".into())
            }
            (None, None) => return invalid("one of `profile` or `command` is required".into()),
            (None, Some(cmd)) if cmd.is_empty() => {
                return invalid("`command` must hold at least the program".into())
            }
            _ => {}
        }
        let short = |field: &str, v: &str| -> Result<(), RegistryError> {
            if v.chars().count() > MAX_SHORT_TEXT {
                return invalid(format!(
                    "`{field}` is longer than {MAX_SHORT_TEXT} characters"
                ));
            }
            if v.contains('\0') {
                return invalid(format!("`{field}` holds a NUL character"));
            }
            Ok(())
        };
        if let Some(p) = &self.profile {
            short("profile", p)?;
        }
        if let Some(n) = &self.name {
            short("name", n)?;
        }
        if let Some(r) = &self.request_id {
            short("request_id", r)?;
        }
        if self.labels.len() > MAX_LABELS {
            return invalid(format!("`labels` holds more than {MAX_LABELS} entries"));
        }
        for (k, v) in &self.labels {
            short("labels", k)?;
            short("labels", v)?;
            if k.is_empty() || k.contains('=') || k.contains(',') {
                return invalid("a `labels` key must be non-empty and hold no '=' or ','".into());
            }
        }
        let argc = self.command.as_ref().map_or(0, Vec::len) + self.args.len();
        if argc > MAX_ARGS {
            return invalid(format!(
                "`command` and `args` hold more than {MAX_ARGS} entries"
            ));
        }
        let mut total = 0;
        for (field, list) in [
            ("command", self.command.as_deref().unwrap_or(&[])),
            ("args", &self.args[..]),
        ] {
            if list.iter().any(|a| a.contains('\0')) {
                return invalid(format!("`{field}` holds a NUL character"));
            }
            if list.iter().any(|a| a.len() > MAX_ARG_BYTES) {
                return invalid(format!(
                    "an entry of `{field}` is longer than {} KiB; pass large input on `stdin`",
                    MAX_ARG_BYTES >> 10
                ));
            }
            total += list.iter().map(String::len).sum::<usize>();
        }
        total += self
            .env
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>();
        if total > MAX_ARGV_BYTES {
            return invalid(format!(
                "`command`, `args` and `env` together are longer than {} KiB",
                MAX_ARGV_BYTES >> 10
            ));
        }
        if self.env.len() > MAX_ENV {
            return invalid(format!("`env` holds more than {MAX_ENV} entries"));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return invalid(
                    "an `env` name must be non-empty and hold no '=' or NUL, and a value no NUL"
                        .into(),
                );
            }
        }
        if self
            .stdin
            .as_ref()
            .is_some_and(|s| s.len() > MAX_STDIN_BYTES)
        {
            return invalid(format!(
                "`stdin` is longer than {} KiB",
                MAX_STDIN_BYTES >> 10
            ));
        }
        if self.stdin.as_deref().is_some_and(|s| s.contains('\0')) {
            // NUL is fine on a pipe, but keep requests text-only like the rest of the API.
            return invalid("`stdin` holds a NUL character".into());
        }
        let backoff = self.restart_backoff.unwrap_or_default();
        check_restart(
            &[
                ("restart_backoff.base", backoff.base),
                ("restart_backoff.cap", backoff.cap),
                ("restart_backoff.reset_after", backoff.reset_after),
                ("restart_window", self.restart_window),
            ],
            self.max_restarts,
        )
        .map_err(RegistryError::InvalidRequest)?;
        Ok(())
    }

    /// Whether the request gives any restart setting (and so needs a runtime whose
    /// `restart` capability is true).
    pub fn asks_for_restart(&self) -> bool {
        self.restart.is_some()
            || self.restart_backoff.is_some()
            || self.max_restarts.is_some()
            || self.restart_window.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_only_move_forward_and_terminal_is_final() {
        use WorkerState::*;
        assert!(Starting.may_become(Running));
        assert!(Running.may_become(Stopping));
        assert!(Stopping.may_become(Stopped));
        assert!(Running.may_become(Unknown));
        assert!(Unknown.may_become(Running));
        assert!(!Stopping.may_become(Running));
        assert!(!Running.may_become(Starting));
        for t in [Exited, Stopped, Failed] {
            for any in WorkerState::ALL {
                assert!(!t.may_become(any), "{t} -> {any}");
            }
        }
    }

    fn req() -> SpawnRequest {
        SpawnRequest {
            profile: Some("shell".into()),
            args: vec!["echo hi".into()],
            ..Default::default()
        }
    }

    #[test]
    fn states_round_trip_and_terminal_ones_are_known() {
        for st in WorkerState::ALL {
            assert_eq!(WorkerState::parse(st.as_str()).unwrap(), st);
            let json = serde_json::to_string(&st).unwrap();
            assert_eq!(json, format!("\"{}\"", st.as_str()));
        }
        let terminal: Vec<_> = WorkerState::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            [
                WorkerState::Exited,
                WorkerState::Stopped,
                WorkerState::Failed
            ]
        );
        assert_eq!(
            WorkerState::parse("zombie").unwrap_err().code(),
            "invalid_request"
        );
        for reason in [
            FailReason::SpawnFailed,
            FailReason::Killed,
            FailReason::Lost,
            FailReason::CrashLoop,
        ] {
            let json = serde_json::to_string(&reason).unwrap();
            assert_eq!(json, format!("\"{}\"", reason.as_str()));
        }
    }

    #[test]
    fn spawn_request_refuses_unknown_fields() {
        let err = serde_json::from_str::<SpawnRequest>(r#"{"profile":"shell","cmd":["x"]}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `cmd`"), "{err}");
    }

    #[test]
    fn spawn_request_validation_names_the_field() {
        assert!(req().validate().is_ok());
        let both = SpawnRequest {
            command: Some(vec!["sh".into()]),
            ..req()
        };
        assert!(both
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not both"));
        let none = SpawnRequest {
            profile: None,
            ..req()
        };
        assert!(none.validate().is_err());
        let empty = SpawnRequest {
            profile: None,
            command: Some(vec![]),
            ..req()
        };
        assert!(empty
            .validate()
            .unwrap_err()
            .to_string()
            .contains("`command`"));
        let mut env = req();
        env.env.insert("A=B".into(), "x".into());
        assert!(env.validate().unwrap_err().to_string().contains("`env`"));
        let mut nul = req();
        nul.args.push("a\0b".into());
        assert!(nul.validate().unwrap_err().to_string().contains("`args`"));
        let long = SpawnRequest {
            name: Some("n".repeat(300)),
            ..req()
        };
        assert!(long.validate().unwrap_err().to_string().contains("`name`"));
        let huge_arg = SpawnRequest {
            args: vec!["x".repeat(limits::MAX_ARG_BYTES + 1)],
            ..req()
        };
        assert!(huge_arg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("`args`"));
        let many_args = SpawnRequest {
            args: vec!["x".repeat(100 << 10); 3],
            ..req()
        };
        assert!(many_args
            .validate()
            .unwrap_err()
            .to_string()
            .contains("together"));
        let mut big_env = req();
        big_env
            .env
            .insert("A".into(), "v".repeat(limits::MAX_ARGV_BYTES));
        assert!(big_env
            .validate()
            .unwrap_err()
            .to_string()
            .contains("together"));
        let big_stdin = SpawnRequest {
            stdin: Some("s".repeat(limits::MAX_STDIN_BYTES + 1).into()),
            ..req()
        };
        assert!(big_stdin
            .validate()
            .unwrap_err()
            .to_string()
            .contains("`stdin`"));
        let at_limits = SpawnRequest {
            args: vec![
                "x".repeat(limits::MAX_ARG_BYTES),
                "y".repeat(limits::MAX_ARG_BYTES - 100),
            ],
            stdin: Some("s".repeat(limits::MAX_STDIN_BYTES).into()),
            ..req()
        };
        assert!(at_limits.validate().is_ok());
    }

    #[test]
    fn spawn_request_reads_a_restart_policy_and_bounds_it() {
        let r: SpawnRequest = serde_json::from_str(
            r#"{"profile":"shell","restart":"on-failure","max_restarts":3,
                "restart_backoff":{"base":"20ms","cap":"1s"},"restart_window":"1m"}"#,
        )
        .unwrap();
        assert!(r.asks_for_restart() && r.validate().is_ok());
        assert_eq!(r.restart, Some(Restart::OnFailure));
        let b = r.restart_backoff.unwrap();
        assert_eq!(
            (b.base, b.cap, b.reset_after),
            (
                Some(Duration::from_millis(20)),
                Some(Duration::from_secs(1)),
                None
            )
        );
        // It goes to another roster as it came, and one without restart keys stays without.
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(serde_json::from_value::<SpawnRequest>(json).unwrap(), r);
        let plain = serde_json::to_value(req()).unwrap();
        assert!(plain.get("restart").is_none() && plain.get("restart_window").is_none());
        assert!(!req().asks_for_restart());
        // A restart key set to null is not given, as everywhere else in the request.
        let nulls: SpawnRequest = serde_json::from_str(
            r#"{"profile":"shell","restart":null,"max_restarts":null,"restart_window":null,
                "restart_backoff":{"base":null,"cap":null,"reset_after":null}}"#,
        )
        .unwrap();
        assert_eq!(nulls.restart_window, None);
        assert_eq!(nulls.restart_backoff.unwrap(), BackoffRequest::default());
        let nulls: SpawnRequest = serde_json::from_str(
            r#"{"profile":"shell","args":null,"env":null,"labels":null,"restart_backoff":null}"#,
        )
        .unwrap();
        assert_eq!(
            nulls,
            SpawnRequest {
                profile: Some("shell".into()),
                ..SpawnRequest::default()
            }
        );

        for (body, field) in [
            (r#"{"profile":"p","max_restarts":10001}"#, "max_restarts"),
            (
                r#"{"profile":"p","restart_window":"2days"}"#,
                "restart_window",
            ),
            (
                r#"{"profile":"p","restart_backoff":{"cap":"25h"}}"#,
                "restart_backoff.cap",
            ),
        ] {
            let r: SpawnRequest = serde_json::from_str(body).unwrap();
            let e = r.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{body}: {e}");
        }
        for body in [
            r#"{"profile":"p","restart":"sometimes"}"#,
            r#"{"profile":"p","restart_backoff":{"jitter":"1s"}}"#,
            r#"{"profile":"p","restart_window":"forever"}"#,
            // A table written as a list (serde's derive would read it by position).
            r#"{"profile":"p","restart_backoff":[null,"1s"]}"#,
            r#"{"profile":"p","restart_backoff":[]}"#,
        ] {
            assert!(
                serde_json::from_str::<SpawnRequest>(body).is_err(),
                "{body}"
            );
        }
    }

    #[test]
    fn worker_health_reads_and_writes_its_wire_names() {
        for h in HealthState::ALL {
            assert_eq!(HealthState::parse(h.as_str()).unwrap(), h);
            assert_eq!(
                serde_json::to_string(&h).unwrap(),
                format!("\"{}\"", h.as_str())
            );
        }
        assert_eq!(
            HealthState::parse("sick").unwrap_err().code(),
            "invalid_request"
        );
        let caps: Capabilities = serde_json::from_str(
            r#"{"spawn":true,"input":true,"stop":true,"output":true,"remove":true}"#,
        )
        .unwrap();
        assert!(!caps.restart, "an older roster's answer restarts nothing");
    }

    #[test]
    fn health_debug_scrubs_source_messages() {
        let mut h = SourceHealth::unavailable("cannot reach http://10.0.0.9:7411/", None);
        h.diagnostics.push(Diagnostic {
            code: "descriptor_malformed".into(),
            message: "bad JSON in /run/legacy/w1.json".into(),
        });
        let text = format!("{h:?}");
        assert!(
            !text.contains("10.0.0.9") && !text.contains("/run/legacy"),
            "{text}"
        );
        assert!(text.contains("descriptor_malformed"), "{text}");
    }

    #[test]
    fn spawn_request_debug_hides_environment_values() {
        let mut r = req();
        r.env.insert("TOKEN".into(), "s3cr3t-value".into());
        r.stdin = Some("password123".into());
        let dbg = format!("{r:?}");
        assert!(!dbg.contains("s3cr3t-value"), "{dbg}");
        assert!(!dbg.contains("password123"), "{dbg}");
    }

    #[test]
    fn worker_view_serializes_times_as_rfc3339() {
        let w = SourceWorker {
            key: SourceKey::new("k"),
            name: Some("build".into()),
            labels: BTreeMap::new(),
            state: WorkerState::Exited,
            exit_code: Some(0),
            reason: None,
            created_at: OffsetDateTime::UNIX_EPOCH,
            started_at: None,
            ended_at: None,
            last_seen_at: None,
            profile: Some("shell".into()),
            args: vec![],
            command: None,
            restarts: 0,
            last_exit: None,
            retry_at: None,
            message: None,
            health: None,
        };
        let id: WorkerId = "w_0123456789ABCDEFGHJKMNPQRS".parse().unwrap();
        let view = WorkerView::from_source(id, RuntimeId::new("local").unwrap(), &w);
        let json = serde_json::to_value(&view).unwrap();
        assert!(json.get("health").is_none(), "absent without a probe");
        assert_eq!(json["created_at"], "1970-01-01T00:00:00Z");
        assert_eq!(json["state"], "exited");
        assert_eq!(json["started_at"], serde_json::Value::Null);
        let back: WorkerView = serde_json::from_value(json).unwrap();
        assert_eq!(back, view);
    }
}
