//! Process supervision for Roster, as a library: the engine behind the `embedded` runtime.
//!
//! A [`Runtime`] spawns workers (OS processes, each in its own process group) from named
//! [`Profile`]s or, where allowed, from an argv; captures their stdout and stderr as numbered
//! chunks and keeps the newest bytes of each; feeds their stdin; stops them (SIGTERM, then
//! SIGKILL after a grace period); and publishes every change as a sequence of
//! [`RuntimeEvent`]s. There is no HTTP here: `source-embedded` adapts it to the registry.
//!
//! ```
//! use std::collections::BTreeMap;
//! use worker_runtime::{OutputItem, Profile, Runtime, RuntimeConfig, SpawnSpec, State};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # tokio::runtime::Runtime::new()?.block_on(async {
//! let shell = Profile { command: vec!["/bin/sh".into(), "-c".into()], ..Default::default() };
//! let runtime = Runtime::new(RuntimeConfig {
//!     profiles: BTreeMap::from([("shell".to_string(), shell)]),
//!     ..Default::default()
//! })?;
//!
//! let worker = runtime
//!     .spawn(SpawnSpec {
//!         profile: Some("shell".into()),
//!         args: vec!["echo hello".into()],
//!         ..Default::default()
//!     })
//!     .await?;
//!
//! let mut output = runtime.output(worker.id, 0, true)?;
//! let mut text = Vec::new();
//! while let Some(item) = output.next().await {
//!     match item {
//!         OutputItem::Chunk { data, .. } => text.extend_from_slice(&data),
//!         OutputItem::Gap { .. } => {}
//!         OutputItem::End => break,
//!     }
//! }
//! assert_eq!(text, b"hello\n");
//! assert_eq!(runtime.get(worker.id)?.state, State::Exited);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })
//! # }
//! ```
//!
//! # Guarantees
//!
//! **Environment.** A worker does not inherit the host's environment, so the host's secrets
//! (API tokens and the like) never leak into workers. It gets `PATH` (the host's, or
//! `/usr/local/bin:/usr/bin:/bin`), `HOME` and `LANG` when the host has them, then the
//! profile's `env`, then the spawn request's `env` (later ones win).
//!
//! **No orphans.** A worker is its process group. When its leader exits, the rest of the group
//! is SIGKILLed. Workers also die with the runtime:
//! - dropping the last [`Runtime`] clone, or [`Runtime::shutdown`], ends every worker;
//! - each worker carries `PR_SET_PDEATHSIG = SIGKILL`, tied to the runtime's spawner
//!   threads (a few long-lived threads that start every worker and live exactly as long as
//!   the runtime), so a leader dies with the runtime's process even when that process is
//!   SIGKILLed;
//! - processes the leader started are not covered by that, so each runtime runs a small
//!   watchdog process (`/bin/sh`) that knows the live process groups and SIGKILLs them when the
//!   runtime's process goes away, however it went. A worker turns `running` only once the
//!   watchdog's pipe holds its group (or after 5 s, with a warning, if the watchdog takes
//!   nothing).
//! - a watchdog that dies (or stops reading and is given up on) is replaced: the runtime
//!   knows every live group, starts a new watchdog after a backoff (1 s, doubling up to 30 s,
//!   back to 1 s once one has lived a minute) and tells it every group again. Until the new
//!   one holds them all, [`Runtime::health`] reports [`Problem::WatchdogGone`], spawns are
//!   refused with [`RuntimeError::Unavailable`] (with a retry hint) rather than started
//!   unguarded, and a restart policy's next run waits.
//!
//! **Processes that leave the group.** Stop, the kill when the leader exits and the
//! watchdog all signal the worker's process group, so a process that deliberately leaves it
//! (`setsid`, `setpgid`) is outside it. Where the host offers a writable cgroup v2 (found
//! from `/proc/self/mountinfo` and `/proc/self/cgroup`, or
//! [`RuntimeConfig::cgroup_root`]), each run of a worker is also in a cgroup of its own,
//! `roster-<instance>/w-<n>` under the runtime's own cgroup; the child enters it before its
//! `execve`, so nothing the worker starts is ever outside it. Every SIGKILL of a stop, the
//! kill at the leader's exit, the runtime's drop and the watchdog then also write `1` to
//! `cgroup.kill`, which kills those processes too, and the cgroup is removed once empty.
//! Where there is no such cgroup v2 (or with `contain = false`), [`Runtime::containment`]
//! says so (the `embedded` source shows it as a `not_contained` diagnostic of the runtime),
//! and such a process outlives its worker. If it holds the worker's output pipes, it
//! delays the worker's end by the idle drain timeout: the worker ends once its output has
//! been idle for 2 s, and what the process writes after that is not captured.
//!
//! **Output.** stdout and stderr are read in chunks of up to 64 KiB, numbered by one `seq`
//! per worker across both streams, from 1, without holes. Bytes are kept raw (invalid UTF-8 is
//! kept as is), but a chunk never ends inside a valid UTF-8 character: an incomplete character
//! at the end of a read is carried into the stream's next chunk. At least the newest
//! `output_retention` bytes are kept (at most one chunk more), also after the worker ended,
//! until its record is removed (the log is `registry_core::output_log::OutputLog`, the one
//! every source that captures output uses). Readers ([`OutputReader`]) pull from that log, so a slow reader
//! never slows the runtime or another reader; one that falls behind gets an
//! [`OutputItem::Gap`]. When the runtime is dropped, the readers of a worker that had not
//! ended stop (with `None`) once they have read what was captured.
//!
//! **States.** `Starting` → `Running` → `Stopping` → `Exited` | `Stopped` | `Failed` (see
//! [`State`]). A worker becomes terminal only after its output is drained, so
//! [`OutputItem::End`] always follows its last chunk, and a terminal state never changes.
//!
//! **Restarts.** A profile's [`RestartPolicy`] may start a worker whose process ended by
//! itself again, after a jittered, capped exponential delay: same id, same output log (seqs
//! go on; a line on stderr marks each restart), `Starting` with
//! [`WorkerInfo::retry_at`] while it waits, [`WorkerInfo::restarts`] and
//! [`WorkerInfo::last_exit`] counting and describing the runs. Past `max_restarts` within the
//! window it fails with [`FailReason::CrashLoop`]; a stop ends the policy at once. A spawn
//! request's own `restart`, `restart_backoff`, `max_restarts` and `restart_window` override
//! the profile's ([`RestartPolicy::with_request`]).
//!
//! **Health probes.** A profile's [`Probe`] (`exec`, `http` or `tcp`) checks each running
//! worker at its interval, at most `max_probes` probes of the runtime at once;
//! [`WorkerInfo::health`] says `Unknown` (each run starts so), `Healthy` or `Unhealthy` after
//! the thresholds, and each change is an event. With [`OnUnhealthy::Restart`] an unhealthy run
//! is stopped and restarted through the restart policy, as after a failure. The probe's
//! target never leaves the config: only its [`ProbeKind`] is shown.
//!
//! **Events.** Every change of a worker is a [`RuntimeEvent::Upserted`] with its full view,
//! every removal a [`RuntimeEvent::Removed`], numbered from 1 in a ring bounded by count and
//! by bytes.
//! [`Runtime::snapshot`] returns all workers with the last seq atomically, so a client can list
//! and then follow [`Runtime::events`] without missing or repeating a change.
//!
//! **Bounded requests.** A spawn request's strings are bounded (see [`limits`]), and so is a
//! stop's grace period ([`limits::MAX_GRACE`]).
//!
//! **Errors.** [`RuntimeError`] messages are written for people and never contain a path, a
//! pid or an environment value.
//!
//! The runtime must be created inside a tokio runtime, whose tasks it uses.

#![warn(missing_docs)]

mod config;
mod events;
/// Bounds on one spawn request and on a stop's grace period: the core's, which the registry
/// and every source share. [`Runtime::spawn`] refuses a request beyond them with
/// [`RuntimeError::InvalidRequest`], whose message names the field (never its value).
pub use registry_core::limits;
mod output;
mod probe;
mod restart;
mod runtime;
mod spawner;
mod sys;
mod types;
mod util;
mod watchdog;

pub use config::{Profile, RuntimeConfig};
pub use events::{EventReader, RuntimeEvent};
pub use output::{OutputItem, OutputReader};
pub use probe::{OnUnhealthy, Probe};
pub use restart::{Backoff, Restart, RestartPolicy, MAX_RESTARTS_LIMIT};
pub use runtime::{Profiles, Runtime};
pub use types::{
    Containment, FailReason, Health, HealthState, LastExit, LocalId, ProbeKind, Problem,
    RuntimeError, SpawnSpec, State, Stream, WorkerInfo,
};
