//! The public value types: ids, spawn requests, worker views, states and errors.

use std::collections::BTreeMap;
use std::fmt;
use std::num::ParseIntError;
use std::str::FromStr;
use std::time::SystemTime;

use registry_core::Redacted;

use crate::config::RedactedMap;

/// A worker's id inside one [`Runtime`](crate::Runtime): issued from 1 upwards, never reused by
/// that runtime value. Combine it with [`Runtime::instance_id`](crate::Runtime::instance_id)
/// for a key that is unique across restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalId(pub u64);

impl fmt::Display for LocalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for LocalId {
    type Err = ParseIntError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(LocalId)
    }
}

/// What to run: exactly one of `profile` or `command`, plus arguments and metadata.
///
/// `Debug` output redacts the env values and the stdin text.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SpawnSpec {
    /// The name of a [`Profile`](crate::Profile) of the runtime.
    pub profile: Option<String>,
    /// An argv to run instead of a profile; only where
    /// [`RuntimeConfig::allow_commands`](crate::RuntimeConfig::allow_commands) is set.
    pub command: Option<Vec<String>>,
    /// Arguments appended to the profile's (or the command's) argv.
    pub args: Vec<String>,
    /// Environment for this worker, applied last (it wins over the profile's).
    pub env: BTreeMap<String, String>,
    /// A client-given name; not unique.
    pub name: Option<String>,
    /// Client-given labels.
    pub labels: BTreeMap<String, String>,
    /// Text written to the worker's stdin right after it starts.
    pub stdin: Option<String>,
    /// Idempotency key: a second spawn with the same key and the same spec returns the same
    /// worker; with another spec it is a [`RuntimeError::Conflict`].
    pub request_id: Option<String>,
}

impl fmt::Debug for SpawnSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpawnSpec")
            .field("profile", &self.profile)
            .field("command", &self.command)
            .field("args", &self.args)
            .field("env", &RedactedMap(&self.env))
            .field("name", &self.name)
            .field("labels", &self.labels)
            .field("stdin", &self.stdin.as_ref().map(|_| Redacted(())))
            .field("request_id", &self.request_id)
            .finish()
    }
}

/// A worker's lifecycle state.
///
/// `Starting` → `Running` → `Stopping` → one of the terminal states `Exited`, `Stopped`,
/// `Failed`. A terminal state never changes again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// The record exists; the process is being created.
    Starting,
    /// The process runs.
    Running,
    /// A stop was asked: SIGTERM was sent, SIGKILL follows after the grace period.
    Stopping,
    /// The worker ended by itself, with an exit code.
    Exited,
    /// The worker ended after a stop request (`exit_code` is set if it exited by itself,
    /// `signal` if a signal ended it).
    Stopped,
    /// The worker could not start or ended badly; see [`FailReason`].
    Failed,
}

impl State {
    /// Whether the state is final (`Exited`, `Stopped` or `Failed`).
    pub fn is_terminal(self) -> bool {
        matches!(self, State::Exited | State::Stopped | State::Failed)
    }

    /// The lower-case wire name: `"starting"`, `"running"`, …
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Stopping => "stopping",
            State::Exited => "exited",
            State::Stopped => "stopped",
            State::Failed => "failed",
        }
    }
}

/// Why a worker is [`State::Failed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailReason {
    /// The program could not be started (not found, not executable, bad working directory).
    SpawnFailed,
    /// A signal nobody asked for ended the worker; [`WorkerInfo::signal`] holds its number.
    Killed,
    /// The runtime lost track of the worker. This runtime does not produce it; it exists for
    /// sources that can.
    Lost,
}

impl FailReason {
    /// The snake-case wire name: `"spawn_failed"`, `"killed"`, `"lost"`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::SpawnFailed => "spawn_failed",
            FailReason::Killed => "killed",
            FailReason::Lost => "lost",
        }
    }
}

/// Which output stream a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    /// The lower-case wire name: `"stdout"` or `"stderr"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// The public view of a worker. It never holds a pid or the environment.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerInfo {
    /// The worker's id in its runtime.
    pub id: LocalId,
    /// The client-given name.
    pub name: Option<String>,
    /// The client-given labels.
    pub labels: BTreeMap<String, String>,
    /// The lifecycle state.
    pub state: State,
    /// The exit code, when the process exited by itself.
    pub exit_code: Option<i32>,
    /// The number of the signal that ended the process, when one did.
    pub signal: Option<i32>,
    /// Why the worker failed, when `state` is [`State::Failed`].
    pub reason: Option<FailReason>,
    /// When the record was created.
    pub created_at: SystemTime,
    /// When the process started.
    pub started_at: Option<SystemTime>,
    /// When the worker became terminal.
    pub ended_at: Option<SystemTime>,
    /// The profile asked for, if any.
    pub profile: Option<String>,
    /// The arguments asked for.
    pub args: Vec<String>,
    /// The argv asked for, when spawned by command.
    pub command: Option<Vec<String>>,
}

/// An error of a [`Runtime`](crate::Runtime) call.
///
/// Messages are written for people and never carry a path, a pid or an environment value.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum RuntimeError {
    /// No worker with that id (never existed, or its record was removed).
    #[error("worker not found")]
    NotFound,
    /// The call contradicts the worker's state or an earlier request.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A limit was reached (live workers, pending input); retrying later may succeed.
    #[error("capacity exceeded: {0}")]
    CapacityExceeded(String),
    /// The request is malformed or names something unknown.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The runtime's configuration does not allow the request.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// Something went wrong inside the runtime.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A problem of a runtime's own machinery, as [`Runtime::health`](crate::Runtime::health)
/// reports it. Its message names no path or pid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Problem {
    /// The watchdog process is gone (it died, or stopped reading and was given up on): the
    /// children of workers are no longer killed when the runtime's process is killed. Workers
    /// themselves still are.
    WatchdogGone,
    /// The spawner thread is gone: no worker can be started.
    SpawnerGone,
}

impl Problem {
    /// A stable snake-case code: `"watchdog_gone"`, `"spawner_gone"`.
    pub fn code(self) -> &'static str {
        match self {
            Problem::WatchdogGone => "watchdog_gone",
            Problem::SpawnerGone => "spawner_gone",
        }
    }

    /// A sentence for an operator.
    pub fn message(self) -> &'static str {
        match self {
            Problem::WatchdogGone => {
                "the worker watchdog is gone: workers' children are no longer killed if the \
                 runtime's process is killed"
            }
            Problem::SpawnerGone => "the worker spawner thread is gone: no worker can be started",
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}
