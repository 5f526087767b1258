//! # source-slurm
//!
//! A Roster source kind in a crate of its own: `slurm`. Each worker is a batch job on a
//! Slurm cluster, so the jobs of a cluster that runs build jobs and agent workloads are
//! registered beside every other worker: same ids, same streams, same API. The crate
//! speaks slurmrestd's REST API (plain HTTP and JSON; JWT auth), pinned to one API
//! version (`v0.0.38` by default, Slurm 22.05), and depends on `registry-core` alone of
//! Roster's crates.
//!
//! A server adds the kind with `factories.add::<SlurmSource>()` (`roster` has it among its
//! default kinds); each `slurm` runtime's table is a [`SlurmConfig`]:
//!
//! ```toml
//! [[runtimes]]
//! name = "hpc"
//! source = "slurm"
//! url = "http://127.0.0.1:6820"
//! user = "builder"
//! token_file = "/etc/roster/slurm.jwt"
//! partition = "debug"
//! output_dir = "/shared/roster/hpc"
//! [runtimes.profiles.shell]
//! command = ["/bin/sh", "-c"]
//! time_limit = "30m"
//! ```
//!
//! The source can also be built directly, inside a tokio runtime:
//!
//! ```no_run
//! use std::collections::BTreeMap;
//!
//! use registry_core::{OutputEvent, OutputRequest, RuntimeSource, SpawnRequest};
//! use source_slurm::{Profile, SlurmConfig, SlurmSource};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let shell = Profile {
//!     command: Some(vec!["/bin/sh".into(), "-c".into()]),
//!     ..Default::default()
//! };
//! let config = SlurmConfig {
//!     url: "http://127.0.0.1:6820".into(),
//!     user: "builder".into(),
//!     token_env: Some("SLURM_JWT".to_string().into()),
//!     output_dir: Some("/shared/roster/hpc".into()),
//!     profiles: BTreeMap::from([("shell".to_string(), shell)]),
//!     ..Default::default()
//! };
//! let source = SlurmSource::with_runtime("hpc", config, "./.roster/runtimes/hpc")?;
//! let worker = source
//!     .spawn(SpawnRequest {
//!         profile: Some("shell".into()),
//!         args: vec!["echo hello from $SLURM_JOB_NODELIST".into()],
//!         ..Default::default()
//!     })
//!     .await?;
//! let mut output = source.output(&worker.key, OutputRequest { after: 0, follow: true }).await?;
//! while let Some(event) = output.recv().await {
//!     if let OutputEvent::Chunk(chunk) = event {
//!         print!("{}", String::from_utf8_lossy(&chunk.data));
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # How a worker maps to a job
//!
//! **Spawn** = one `POST /slurm/<version>/job/submit`. The request is checked as the trait
//! asks (unknown profile `invalid_request`, a command where `allow_commands` is off
//! `forbidden`, a full runtime `capacity_exceeded`, a used `request_id` with another
//! request `conflict`). The job's batch script `exec`s the profile's `command` (or the
//! request's) with the request's `args` appended, every word quoted for the shell; or it
//! is the profile's `script` with the `args` as its positional parameters. Its
//! environment is `PATH=/usr/local/bin:/usr/bin:/bin`, the profile's `env`, then the
//! request's (plus Slurm's `SLURM_*`); its working directory the profile's `cwd` (default
//! `/tmp`); its stdin `/dev/null`; its stdout and stderr two files in `output_dir`; it is
//! never requeued. A profile's `time_limit` (rounded up to minutes), `cpus` (of the one
//! task) and `memory` (per node, rounded up to MiB) become the job's; the runtime's
//! `partition` and `account` too. A job Slurm refuses (no such partition, a time limit
//! over the partition's, …) is `invalid_request` with Slurm's own reason. A spawn while
//! the cluster is out of reach is `runtime_unavailable`.
//!
//! The job's name is `roster-<runtime>-<instance>-<nonce>`: the instance is a random id
//! made once and kept in the runtime's state directory (file `slurm-instance`), so two
//! registries on one cluster never take each other's jobs. What the client asked for
//! (name, labels, profile, args — never the environment) is kept in a record file per job
//! in the state directory (`slurm-jobs/`), not on the cluster.
//!
//! **The source key** is the job id. It never reaches a client: the registry derives the
//! worker id from it, and the job id, the node and the paths appear in no view, event,
//! error or health message.
//!
//! **State** comes from polling: one `GET /slurm/<version>/jobs` per `poll_interval` for
//! every job of the runtime, never a request per job. `PENDING` (and configuring,
//! requeued) is `starting`; `RUNNING` (and suspended, completing) `running`; a stopped
//! worker stays `stopping` until its job ends. An ended job ends its worker once its
//! output files are read to their end:
//!
//! - a stop was asked for: `stopped` (with the exit code when the script exited by itself);
//! - `COMPLETED`: `exited` 0; `FAILED`: `exited` with the script's code, or `failed`,
//!   `killed` when a signal ended it, or `spawn_failed` when Slurm could not launch it;
//! - `CANCELLED` from outside (`scancel`), `TIMEOUT`, `OUT_OF_MEMORY`, `DEADLINE`,
//!   `PREEMPTED`: `failed`, `killed`, with a `message` that says which;
//! - `NODE_FAIL`: `failed`, `lost`; `BOOT_FAIL`: `failed`, `spawn_failed`;
//! - a live worker whose job the controller no longer lists: `failed`, `lost`.
//!
//! **Output** is read from the job's two files, every 200 ms while it runs and to their
//! end once it has ended, through the worker's
//! [`OutputLog`](registry_core::output_log::OutputLog): resumable by seq, `gap` for what
//! retention dropped. stdout and stderr keep their own order; their order against each
//! other is only as fine as the reads. Lines slurmstepd writes into a job's stderr
//! (`slurmstepd-<node>: error: *** JOB <id> … CANCELLED …`) are left out: they name the
//! job id and the node. The files must be readable where `roster` runs: on a real
//! cluster `output_dir` is on a shared file system.
//!
//! **No input.** A batch job's stdin is not a stream roster can write to:
//! `capabilities.input` is false, input is `501 unsupported`, and so is a spawn with
//! `stdin`. Nor are workers restarted (`restart` is false).
//!
//! **Stop** = `DELETE /job/<id>?signal=SIGTERM` (every process of the job gets it), the
//! worker `stopping`; after the grace (the stop's, else the profile's, else `grace`) the
//! job is cancelled (`DELETE /job/<id>`: Slurm's SIGTERM, then SIGKILL after its
//! `KillWait`). A pending job, or a zero grace, is cancelled at once. A second stop is a
//! no-op (a shorter grace brings the cancel forward).
//!
//! **Remove** = the record, its record file and the job's output files; `conflict` while
//! live. Terminal workers are removed after `retain_finished`, and beyond `max_finished`
//! the oldest go first.
//!
//! **The controller down.** When a list fails (slurmrestd out of reach, or slurmctld not
//! answering it), the runtime is `unavailable` with `retry_at`, live workers are
//! `unknown`, and the source tries again with backoff (500 ms doubling to 30 s, with
//! jitter). The first answer after it brings every worker back under the same id with
//! its state from the list; jobs that ended meanwhile end their workers as above. The
//! pinned API version is checked again (`GET /slurm/<version>/ping`) at start and after
//! every outage: a cluster that does not serve it leaves the runtime `unavailable` with a
//! message naming the versions it serves.
//!
//! **`roster` restarted.** Jobs outlive the process. A source built on the same state
//! directory lists the cluster's jobs, takes up those with its name prefix and a record
//! file under the same key (the job id: the same worker id), and reads their output again
//! from the files (the newest `output_retention` bytes of each; seqs are counted anew). A
//! stop asked for before the restart is not kept.
//!
//! **Shutdown** stops every live worker as `stop` would and returns when all are
//! terminal (bounded by the longest grace, three poll intervals and 30 s). Dropping the
//! source without it leaves the jobs running, to be taken up again as above.
//!
//! # Bounds
//!
//! - Output: per worker, the log keeps at least `output_retention` bytes and at most one
//!   chunk (64 KiB) more; a read takes at most 256 KiB of a file at a time.
//! - Records: at most `max_workers` live and `max_finished` terminal.
//! - Lifecycle streams: 64 events each, then a `Resync` is owed.
//! - An answer of slurmrestd is read up to 64 MiB; every request has `request_timeout`.
#![warn(missing_docs)]

mod api;
mod config;
mod error;
mod job;
mod source;

use registry_core::{ConfigError, SourceConfig, SourceKind};

pub use config::{Profile, SlurmConfig, API_VERSIONS, DEFAULT_API_VERSION, MAX_GRACE};
pub use source::SlurmSource;

/// The source kind this crate adds: `source = "slurm"` in a `[[runtimes]]` table.
pub const KIND: &str = "slurm";

/// A server adds the kind with `factories.add::<SlurmSource>()`.
impl SourceKind for SlurmSource {
    const KIND: &'static str = KIND;

    /// Parses the runtime's table as a [`SlurmConfig`] (an unknown key is an error naming
    /// it), reads the token, makes `output_dir` and the state files, and starts polling
    /// the cluster without waiting for it; call it inside a tokio runtime.
    fn from_config(config: &SourceConfig) -> Result<Self, ConfigError> {
        let settings: SlurmConfig = config.parse()?;
        SlurmSource::with_runtime(config.runtime_id.as_str(), settings, &config.state_dir.0)
    }
}
