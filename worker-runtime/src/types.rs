//! The public value types of the runtime: local ids, worker views and errors. Spawn requests,
//! states, fail reasons and stream names are the core's own types, re-exported here.

use std::collections::BTreeMap;
use std::fmt;
use std::num::ParseIntError;
use std::str::FromStr;
use std::time::SystemTime;

use registry_core::SpawnRequest;

pub use registry_core::{HealthState, ProbeKind};

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

/// What to run: the core's [`SpawnRequest`], under the name this crate's callers know.
///
/// Exactly one of `profile` (a [`Profile`](crate::Profile) of the runtime) or `command` (an
/// argv, only where [`RuntimeConfig::allow_commands`](crate::RuntimeConfig::allow_commands)
/// is set), plus arguments and metadata. [`Runtime::spawn`](crate::Runtime::spawn) checks it
/// with [`SpawnRequest::validate`], the bounds of [`limits`](crate::limits). A second spawn
/// with the same `request_id` and the same spec returns the same worker; with another spec it
/// is a [`RuntimeError::Conflict`]. `Debug` output redacts the env values and the stdin text.
pub type SpawnSpec = SpawnRequest;

/// A worker's lifecycle state: the core's [`WorkerState`](registry_core::WorkerState).
///
/// `Starting` → `Running` → `Stopping` → one of the terminal states `Exited`, `Stopped`
/// (ended after a stop request; `exit_code` is set if it exited by itself, `signal` if a
/// signal ended it), `Failed` (see [`FailReason`]). A terminal state never changes again. This
/// runtime never reports `Unknown`: it always knows its own processes.
pub use registry_core::WorkerState as State;

/// Why a worker is [`State::Failed`]: the core's [`FailReason`](registry_core::FailReason).
/// `SpawnFailed` (the program could not be started), `Killed` (a signal nobody asked for;
/// [`WorkerInfo::signal`] holds its number) or `Lost` (the exit status could not be read).
pub use registry_core::FailReason;

/// Which output stream a chunk came from: the core's [`StreamKind`](registry_core::StreamKind).
pub use registry_core::StreamKind as Stream;

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
    /// How often the restart policy started the worker's process again.
    pub restarts: u32,
    /// How the previous run ended, once the worker was restarted.
    pub last_exit: Option<LastExit>,
    /// While the worker waits to be restarted (it is [`State::Starting`] then): when the next
    /// run is due.
    pub retry_at: Option<SystemTime>,
    /// Why the worker failed, for the person who asked for it: "program not found: No such
    /// file or directory (os error 2)" for [`FailReason::SpawnFailed`], why its status could
    /// not be read for [`FailReason::Lost`]; also a note on an end that cut its output. Never
    /// a host path (a profile's program or working directory), a pid or an environment value.
    pub message: Option<String>,
    /// What the worker's health probe says; `None` when its profile has no probe.
    pub health: Option<Health>,
}

/// A worker's health as its probe sees it.
///
/// Each run starts `Unknown`; `success_threshold` successes in a row make it `Healthy`,
/// `failure_threshold` failures in a row `Unhealthy`. A terminal worker keeps the health it
/// last had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Health {
    /// The conclusion so far.
    pub status: HealthState,
    /// Since when `status` holds.
    pub since: SystemTime,
    /// The probe's kind (never its target).
    pub probe: ProbeKind,
}

/// How a run of a restarted worker ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LastExit {
    /// The exit code, when the process exited by itself.
    pub code: Option<i32>,
    /// The number of the signal that ended it, when one did.
    pub signal: Option<i32>,
    /// [`FailReason::Killed`] when a signal nobody asked for ended it.
    pub reason: Option<FailReason>,
    /// When it ended.
    pub at: SystemTime,
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
    /// The runtime cannot take the request now (its watchdog is being restarted); retrying
    /// after `retry_after` may succeed.
    #[error("unavailable: {message}")]
    Unavailable {
        /// Why, for people.
        message: String,
        /// When a retry may succeed.
        retry_after: std::time::Duration,
    },
}

/// Whether a runtime's workers are contained in cgroups of their own
/// ([`Runtime::containment`](crate::Runtime::containment)).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Containment {
    /// Each run of a worker is in a cgroup (v2) of its own: stop and the end of the worker
    /// kill every process in it, also those that left the worker's process group.
    Cgroup,
    /// Turned off in the config (`contain = false`): supervision acts on the process group.
    Off,
    /// Asked for, but this host does not offer it (why, for people, without a path):
    /// supervision acts on the process group.
    Unavailable(String),
}

impl Containment {
    /// A sentence for an operator when workers are not contained; `None` when they are.
    pub fn gap(&self) -> Option<String> {
        let why = match self {
            Containment::Cgroup => return None,
            Containment::Off => "containment is turned off in the config".to_string(),
            Containment::Unavailable(why) => why.clone(),
        };
        Some(format!(
            "processes that leave a worker's process group (setsid) are not stopped with it: {why}"
        ))
    }
}

/// A problem of a runtime's own machinery, as [`Runtime::health`](crate::Runtime::health)
/// reports it. Its message names no path or pid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Problem {
    /// The watchdog process is gone (it died, or stopped reading and was given up on) and
    /// its replacement does not hold every live group yet: the children of workers would not
    /// be killed if the runtime's process were killed now (workers themselves still would),
    /// and spawns are refused meanwhile.
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
                "the worker watchdog is gone and is being restarted: until it is back, no \
                 worker is started and workers' children are not killed if the runtime's \
                 process is killed"
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
