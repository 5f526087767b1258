//! # source-docker
//!
//! A Roster source kind in a crate of its own: `docker`. Each worker is a container on a
//! Docker Engine — or on Podman, through its Docker-compatible socket — so a worker can be
//! isolated, limited (memory, CPUs, processes) and kept off the network, while clients see
//! it through the one API like any other worker. The crate speaks the Engine API (version
//! 1.41: Docker 20.10 and newer, Podman 3 and newer) through bollard, over the engine's Unix
//! socket, and depends on `registry-core` alone of Roster's crates.
//!
//! A server adds the kind with `factories.add::<DockerSource>()` (`roster` has it among its
//! default kinds); each `docker` runtime's table is a [`DockerConfig`]:
//!
//! ```toml
//! [[runtimes]]
//! name = "boxes"
//! source = "docker"
//! socket = "/var/run/docker.sock"
//! allow_images = ["roster-test/*"]
//! [runtimes.profiles.shell]
//! image = "roster-test/busybox:1"
//! command = ["/bin/sh", "-c"]
//! memory = "64MiB"
//! pids_limit = 64
//! ```
//!
//! The source can also be built directly, inside a tokio runtime:
//!
//! ```no_run
//! use std::collections::BTreeMap;
//!
//! use registry_core::{OutputEvent, OutputRequest, RuntimeSource, SpawnRequest};
//! use source_docker::{DockerConfig, DockerSource, Profile};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), registry_core::RegistryError> {
//! let shell = Profile {
//!     image: "roster-test/busybox:1".into(),
//!     command: vec!["/bin/sh".into(), "-c".into()],
//!     network: "none".into(),
//!     ..Default::default()
//! };
//! let config = DockerConfig {
//!     profiles: BTreeMap::from([("shell".to_string(), shell)]),
//!     ..Default::default()
//! };
//! let source = DockerSource::with_runtime("boxes", config, "./.roster/runtimes/boxes")?;
//! let worker = source
//!     .spawn(SpawnRequest {
//!         profile: Some("shell".into()),
//!         args: vec!["echo hello".into()],
//!         ..Default::default()
//!     })
//!     .await?;
//! let mut output = source.output(&worker.key, OutputRequest { after: 0, follow: true }).await?;
//! while let Some(event) = output.recv().await {
//!     if let OutputEvent::Chunk(chunk) = event {
//!         print!("{}", String::from_utf8_lossy(&chunk.data));
//!     }
//! }
//! source.shutdown(None).await;
//! # Ok(()) }
//! ```
//!
//! # How a worker maps to a container
//!
//! **Spawn** = create + attach + start. The request is checked as the trait asks (unknown
//! profile `invalid_request`, a command where `allow_commands` is off `forbidden`, a full
//! runtime `capacity_exceeded`, a used `request_id` with another request `conflict`). The
//! container runs the profile's `image` (a command: the runtime's `image`); its entrypoint
//! is the profile's `command` followed by the request's `args` (the image's own entrypoint
//! and command are replaced); its environment the profile's `env`, then the request's. It
//! runs with a small init as PID 1 (`init: true`: PID 1 of a container ignores signals it
//! has no handler for, so without it SIGTERM would do nothing), on the network `network`
//! (default `none`: only the container's own loopback), with the profile's `memory` (swap
//! included), `cpus`, `pids_limit` and `user`. The source never pulls: an image that is not
//! on the engine is `invalid_request`, and one that `allow_images` does not name is
//! `forbidden` (the config is refused before that: every profile's image must be allowed).
//! A container the engine cannot start (no such user in the image, …) is `failed` with
//! `spawn_failed`; a program the init cannot run exits with 127, as in a shell. An engine
//! that is not up (its socket missing, even at start) leaves the runtime `unavailable`
//! until it answers; spawns meanwhile are `runtime_unavailable`.
//!
//! Labels: `roster.runtime` (the runtime's name), `roster.instance` (a random id made once
//! and kept in the runtime's state directory, file `docker-instance`: it tells this
//! registry's containers from another's on the same engine, and is not the worker-id key),
//! `roster.worker` (what the client asked for — name, labels, profile, args, command — as
//! JSON, never the environment), and the profile's `labels`.
//!
//! **The source key** is the container id. It never reaches a client: the registry derives
//! the worker id from it.
//!
//! **State** comes from the engine's `/events` stream (filtered by the instance label), not
//! from polling: `start` makes a worker `running`, `die` makes the source inspect the
//! container and, once its output is drained (10 s at most), end the worker:
//!
//! - a stop was asked for: `stopped` (with the exit code if the command exited by itself);
//! - the kernel's OOM killer ended it (the engine's `OOMKilled`): `failed`, reason
//!   `killed`, `exit_code` 137 — the code tells an OOM kill from another kill, which has no
//!   exit code;
//! - exit code 129 to 192 (death by a signal nobody asked for, e.g. `docker kill`):
//!   `failed`, `killed`;
//! - otherwise `exited` with the code.
//!
//! `destroy` of a live worker's container (removed from outside) makes it `failed`, `lost`;
//! of a terminal one removes the record.
//!
//! **Reconnects.** When the event stream breaks off (the engine restarted or stopped), the
//! runtime is `unavailable` (with `retry_at`), live workers are `unknown`, and the source
//! reconnects with exponential backoff (250 ms doubling to 5 s, with jitter). On
//! reconnect it lists the containers with its instance label, inspects each, sends every
//! lifecycle stream a `Resync` with the whole truth, and follows the events again from a
//! second before the list (what comes twice is harmless). A container gone meanwhile is
//! `failed` with `lost`. Output written while the engine was out of reach is not read back.
//!
//! **Output** comes from the attach made before start: stdout and stderr apart, in order,
//! into the worker's [`OutputLog`](registry_core::output_log::OutputLog) (resumable by seq,
//! `gap` for what retention dropped). **Input** goes to the same attach's stdin, in order
//! (at most 1 MiB waiting per worker, then `capacity_exceeded`); input to a terminal worker
//! is `conflict`.
//!
//! **Stop** = SIGTERM through the engine's kill, the worker `stopping`; after the grace (the
//! stop's, else the profile's, else `grace`; zero: at once) SIGKILL. The engine's own stop
//! call takes whole seconds; the source keeps the timer itself to honour a grace in
//! milliseconds. A second stop is a no-op (a shorter grace brings the SIGKILL forward).
//!
//! **Remove** = removal of the container (forced) and the record; `conflict` while live.
//! Terminal workers are removed after `retain_finished`, and beyond `max_finished` the
//! oldest go first.
//!
//! **`roster` restarted.** Containers outlive the process. A source built on the same state
//! directory (so the same instance label) lists its containers by label and takes them up
//! again under the same key — the same worker id, since the registry's id key is also in
//! the state directory — with their name, labels, profile and args from the `roster.worker`
//! label; their output is read again from the engine's logs (from the start: seqs are
//! counted anew), their stdin is attached again. What was not kept: a stop asked for
//! before the restart (such a worker then ends as its exit says), and a container created
//! but never started is `failed` with `spawn_failed`.
//!
//! **Shutdown** stops every live worker as `stop` would and returns when all are terminal
//! (15 s past the longest grace at most). Dropping the source without it leaves the
//! containers running, to be taken up again as above.
//!
//! **Swarm** (`mode = "swarm"`): the socket is a swarm manager's, and each worker is a
//! one-replica service (`restart_policy: none`, so a task that ends is never started
//! again) with the same labels, argv, environment, init, limits and user as a container
//! would get; its task may run on any node. The source key is the service id. Swarm's
//! event stream has no task events, so the runtime's services (by instance label) and
//! their tasks are listed every 250 ms, two engine calls for the whole runtime; a task that
//! runs makes the worker `running`, one that ends ends it as a container's exit would (a
//! task a node refused, e.g. for want of the image, is `spawn_failed`; one whose node left
//! the swarm is `lost`). Output is the service's log stream, stdout and stderr apart; that
//! stream does not end when the task does, so once the task has ended the output counts as
//! drained when it has been quiet for 500 ms. **Stop** scales the service to zero — the
//! engine sends SIGTERM, then SIGKILL after the grace the service was made with (the
//! profile's or runtime's `grace`; a stop's own grace is not applied, a service's grace
//! being fixed when it is made) — and removes the service once its task has ended; the
//! worker's output stays in the record. A worker that ended by itself keeps its service
//! until its record is removed, as a container is kept. There is no **input** (a task on
//! another machine has no stdin to attach to): the capability is off, a spawn with `stdin`
//! and every input are `unsupported`. A `roster` restarted finds its services by label as
//! it finds containers. An engine that answers but is no swarm manager leaves the runtime
//! `unavailable` with the message "the container engine is not a swarm manager". The image
//! must be on the manager (never pulled) and on every node that may run the task.
//!
//! **Podman.** The conformance suite runs against Podman's Docker-compatible service as
//! well as against dockerd (Podman 4.3.1 from Debian on the test machine).
//! `scripts/start-podman` starts it with the settings that machine needs: `runc` as the
//! runtime, `cgroupfs`, events to a file, and `default_ulimits` for `nofile` and `nproc`
//! no higher than the machine's own hard limits — without them Podman raises both to
//! values a machine without `CAP_SYS_RESOURCE` refuses ("error setting rlimit type 6").
//! Podman names an imported image `localhost/<name>`; a config names it as imported
//! (`roster-test/busybox:1`), which Podman resolves.
//!
//! # Bounds
//!
//! - Output: per worker, the log keeps at least `output_retention` bytes and at most one
//!   chunk (64 KiB) more; the engine keeps its own log of the container (`json-file`) until
//!   the container is removed.
//! - Records: at most `max_workers` live and `max_finished` terminal.
//! - Lifecycle streams: 64 events each, then a `Resync` is owed.
//! - Input: 1 MiB waiting per worker, plus the spawn's `stdin`.
//! - Every engine request has 30 s to be answered (a stream's body is not timed).
//!
//! # Leaks
//!
//! No error message, event, health message or `Debug` output of this crate names the
//! socket, a container, an image or a digest: engine failures are `internal` errors whose
//! detail only reaches the log, an engine out of reach is `runtime_unavailable` with a fixed
//! message, and the public types print counts and redacted fields.
#![warn(missing_docs)]

mod config;
mod engine;
mod error;
mod source;

use registry_core::{ConfigError, SourceConfig, SourceKind};

pub use config::{DockerConfig, Mode, Profile, DEFAULT_SOCKET, MAX_GRACE};
pub use source::DockerSource;

/// The source kind this crate adds: `source = "docker"` in a `[[runtimes]]` table.
pub const KIND: &str = "docker";

/// A server adds the kind with `factories.add::<DockerSource>()`.
impl SourceKind for DockerSource {
    const KIND: &'static str = KIND;

    /// Parses the runtime's table as a [`DockerConfig`] (an unknown key is an error naming
    /// it), keeps the instance label in the runtime's state directory, and starts following
    /// the engine without waiting for it; call it inside a tokio runtime.
    fn from_config(config: &SourceConfig) -> Result<Self, ConfigError> {
        let settings: DockerConfig = config.parse()?;
        DockerSource::with_runtime(config.runtime_id.as_str(), settings, &config.state_dir.0)
            .map_err(|e| config.build_error(e))
    }
}
