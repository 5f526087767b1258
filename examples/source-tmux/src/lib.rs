//! # source-tmux
//!
//! A Roster source kind in a crate of its own: `tmux`. Each worker is a tmux session on a
//! tmux server this runtime owns (`tmux -L <socket_name>`), so an operator can look at a
//! worker's terminal with `tmux -L <socket_name> attach -t …` while Roster serves its
//! output, input and lifecycle through the one API. The crate depends on `registry-core`
//! alone, as any kind written outside the project would; `roster-tmux` is `roster` with this
//! kind added.
//!
//! A server adds the kind with `factories.add::<TmuxSource>()` (see
//! [`SourceKind`](registry_core::SourceKind)); each `tmux` runtime's table is a
//! [`TmuxConfig`]:
//!
//! ```toml
//! [[runtimes]]
//! name = "term"
//! source = "tmux"
//! socket_name = "roster-term"   # default "roster-<name>"
//! [runtimes.profiles.shell]
//! command = ["/bin/sh", "-c"]
//! ```
//!
//! The source can also be built directly, inside a tokio runtime:
//!
//! ```no_run
//! use std::collections::BTreeMap;
//!
//! use registry_core::{OutputEvent, OutputRequest, RuntimeSource, SpawnRequest};
//! use source_tmux::{Profile, TmuxConfig, TmuxSource};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), registry_core::RegistryError> {
//! let shell = Profile { command: vec!["/bin/sh".into(), "-c".into()], ..Default::default() };
//! let source = TmuxSource::new(
//!     TmuxConfig {
//!         socket_name: Some("roster-demo".into()),
//!         profiles: BTreeMap::from([("shell".to_string(), shell)]),
//!         ..Default::default()
//!     },
//!     "./.roster/runtimes/demo",
//! )?;
//! let worker = source
//!     .spawn(SpawnRequest {
//!         profile: Some("shell".into()),
//!         args: vec!["echo hello".into()],
//!         ..Default::default()
//!     })
//!     .await?;
//! let mut output = source.output(&worker.key, OutputRequest { after: 0, follow: true }).await?;
//! let mut text = Vec::new();
//! while let Some(event) = output.recv().await {
//!     if let OutputEvent::Chunk(chunk) = event {
//!         text.extend_from_slice(&chunk.data);
//!     }
//! }
//! assert_eq!(text, b"hello\n");
//! source.shutdown(None).await;
//! # Ok(()) }
//! ```
//!
//! # How a worker runs
//!
//! **Spawn.** The request is checked as the trait asks (an unknown profile is
//! `invalid_request`, a command where `allow_commands` is off `forbidden`, a full runtime
//! `capacity_exceeded`, a used `request_id` with another request `conflict`, the same
//! request the same worker); the argv is the profile's `command` followed by the request's
//! `args`, the environment the profile's `env` and then the request's. The source first
//! checks that the working directory exists and the program is an executable file on the
//! worker's `PATH`; if not, the worker is `failed` with `spawn_failed` (a program that then
//! still cannot be executed exits with 126 or 127, as in a shell). Then one tmux client
//! runs
//!
//! ```text
//! new-session -d -s <session> -x 200 -y 50 -P -F '#{pane_pid}' [-c <cwd>] -- /bin/sh -c <wrapper> roster-worker <argv…>
//! ; set-option -t =<session>: remain-on-exit on
//! ; pipe-pane -O -t =<session>: 'exec cat > <fifo>'
//! ```
//!
//! (A part of a tmux command line that ends in `;` is escaped, and `#` is doubled where
//! tmux expands formats, so every argument reaches the worker unchanged.) The pane's
//! process is the *wrapper*, a small `/bin/sh` script. It unsets `TMUX` and `TMUX_PANE`,
//! sets the pane's tty raw and silent (`stty raw -echo`: bytes pass unchanged both ways,
//! no `\r\n` for `\n`, input is not echoed into the output, control characters raise no
//! signals), and sources the worker's environment from a file (mode 0600, deleted at once,
//! so values never appear on a command line). It then starts the command's process, a
//! subshell, and waits for it. The subshell tells the source it is ready (`tmux wait-for
//! -S <session>-r`), waits at a gate (`tmux wait-for <session>-g`), and `exec`s the
//! command. The source waits for the ready signal (polling the pane meanwhile, so a
//! wrapper that dies is a `spawn_failed` worker at once, and for 30 s at most), makes sure
//! the pipe's `cat` has the FIFO open, opens the gate (`wait-for -S`, which also wakes a
//! waiter that arrives later), and reports the worker `running`. The request's `stdin` is
//! the first input written. When the server has just exited (its last session ended), a
//! `new-session` that comes then fails with "server exited unexpectedly"; it is tried again
//! (a new server starts).
//!
//! *Why a wrapper stays and does not `exec` the command.* tmux ends a pane when its
//! process has exited and the pty *seems* empty. Found by experiment (tmux 3.3a, in plain
//! shell too): the last bytes a process writes before it exits can still be on their way
//! through the kernel then, and are lost — under load, one worker in twelve that wrote
//! 512 KiB and exited lost a few KiB. A process that outlives the command in the pane loses
//! nothing: when the command has ended, the wrapper prints an end mark (an escape sequence
//! terminals ignore, with a random nonce and the status), and everything before the mark in
//! the output is the command's, complete. Then it waits for the source.
//!
//! Environment: tmux clients of this source run with an empty environment but `PATH`,
//! `HOME`, `LANG`, `LC_ALL`, `LC_CTYPE` and `TMUX_TMPDIR`, and with `-f /dev/null`; a
//! server they start (the first spawn starts it) passes only those on, so nothing else of
//! this process's environment (tokens!) reaches a worker. A worker's environment is the
//! server's, plus `TERM` and the like from tmux, plus the profile's and the request's
//! `env`. Environment names must be letters, digits and `_` (not starting with a digit),
//! since the wrapper exports them; another name is `invalid_request` (in a profile, a
//! config error).
//!
//! **Output.** The pane's output goes through `pipe-pane -O` into a FIFO in the runtime's
//! state directory, which the source opens for reading *before* the pipe exists and unlinks
//! once both ends are open; a task reads it in reads of up to 64 KiB into the worker's
//! [`OutputLog`](registry_core::output_log::OutputLog) (through an `OutputWriter`, so a
//! chunk never splits a UTF-8 character), taking the end mark out (bytes that could be the
//! start of the mark wait for the next read). A pty merges stdout and stderr: every chunk is
//! `stdout`, in the order written. Since the source always drains the FIFO, disk use is nil
//! and memory is the log's bound.
//!
//! **Exit.** The end mark ends the worker at once: what is left of its process group
//! (the wrapper, children the command left behind) is killed — a worker is its process
//! group, as in the `embedded` kind — its session is killed, which closes the pipe (`cat`
//! copies what is left and exits), its output is drained to the end of the FIFO, and then
//! it is `exited` with the code, `stopped` if a stop was asked for (with the code if it
//! exited by itself), or `failed` with `killed` for a signal nobody asked for; `ended_at`
//! is set. The status is the one the wrapper's shell saw: 129 to 192 mean death by signal
//! 1 to 64, as in any shell (a program that exits with such a code by itself is taken as
//! killed by that signal).
//!
//! A monitor task watches for what the mark cannot tell: while any worker runs, it runs one
//! `tmux list-panes -a` every 250 ms (one process per tick for all workers; none while no
//! worker runs). A session that vanished (killed from outside, or the whole server) ends
//! its worker as `failed` with `lost` (or `stopped` during a stop), after a SIGKILL to its
//! group. A dead pane (the wrapper itself was killed) ends its worker with the pane's
//! `#{pane_dead_status}` or `#{pane_dead_signal}`. tmux 3.3 now and then misses the
//! SIGCHLD of a pane's process (seen on fresh servers) and shows the pane dead without a
//! status until its next SIGCHLD: the monitor then sends the server a SIGCHLD, which makes
//! it reap (a spurious one costs it one `waitpid`).
//!
//! **Input.** Input accepted (`Ok`, a `202` over the API) is delivered once the worker
//! reads its stdin, also when it comes right after the spawn's answer on a loaded machine.
//! Each `input` is queued (at most 1 MiB per worker waits, beyond which `input` is
//! `capacity_exceeded`, which is retryable); nothing is written before the command runs in
//! its pane (the gate is open), and what is written then waits in the pane's tty until the
//! command reads it. The queue is written in order by the worker's writer task, with one
//! tmux client per piece: `load-buffer -b <buffer> -` from the
//! client's stdin, then `paste-buffer -d -r` into the pane. That takes any bytes, unchanged
//! (`-r`: no LF → CR), of any length in one call, where `send-keys -l` takes only text and
//! `send-keys -H` needs three bytes of command line per byte against tmux's limit of about
//! 16 KiB per command. A client that could not be started or could not connect to the
//! server (a loaded machine) did nothing, and is tried again for up to 10 s; any other
//! failure ends the worker's input, since trying again could write a piece twice. Input
//! to a terminal worker is `conflict`. Input the worker does not
//! read waits in the tmux server, which bounds it by nothing but memory.
//!
//! **Stop.** SIGTERM to the pane's process group (the wrapper survives it with a handler of
//! its own; the command has the default action), state `stopping`; after the grace (the
//! stop's, else the profile's, else `grace`; at most one day; a zero grace at once)
//! SIGKILL to every process of the group but the wrapper (found in `/proc`). The command
//! ends, the wrapper prints the end mark, and the worker ends as above, `stopped`, with its
//! output complete. A worker that still has not ended 5 s after the SIGKILL has its session
//! killed and counts as `stopped`. A stop of a terminal or stopping worker is a no-op that
//! succeeds (a shorter grace brings the SIGKILL forward). A worker stopped while its
//! session is still being set up never runs its command and ends `stopped`. Signals go to a
//! group only while its leader's pid names the same process (its start time in `/proc`),
//! since tmux, not this source, reaps the pane's process.
//!
//! **Records.** Terminal records stay for `retain_finished` (at most `max_finished` of
//! them; the oldest go first), then are removed with a `Removed` event; `remove` of a
//! terminal worker removes it at once, of a live one is `conflict`.
//!
//! **Lifecycle streams.** Each starts with a `Resync`; each holds at most
//! 64 events. One that overflows gets nothing more until there is room for
//! a fresh `Resync` (and the health), which it then gets: it never loses track silently.
//! After `shutdown` the streams end.
//!
//! **Shutdown.** `shutdown(grace)` refuses new spawns, stops every live worker as `stop`
//! would, each with its own grace cut to `grace`, and returns once all are terminal. Dropping the source without it kills the live
//! sessions (SIGKILL to their groups, then `kill-session`), blocking briefly.
//!
//! **Ownership, and what an earlier run left.** Session names are generated and never
//! shown: `roster-w<pid>-<start time>-<instance>-<n>`, naming the process (and the source
//! within it) that made them. tmux sessions outlive the process that made them, so when
//! `roster` is killed its workers keep running in the tmux server (a wrapper whose command
//! ended waits a minute for the source, then ends). When a source starts, it kills every
//! session on its server whose name has this form and whose owner no longer runs (SIGKILL
//! to the pane's group, then `kill-session`), and deletes their files in its state
//! directory: such workers can't be followed again, since their output pipe and their
//! records are gone. Sessions of a source that still runs — another `roster` on the same
//! server, or a `roster check-config` that builds the source while the server runs — are
//! left alone, and so are sessions of other names.
//!
//! **Health.** `ready`; `degraded` while the monitor's `list-panes` fails three times in a
//! row for another reason than a stopped server (workers are then not watched).
//!
//! # Bounds
//!
//! - Output: per worker, the log keeps at least `output_retention` bytes (the profile's,
//!   else the runtime's) and at most one chunk (64 KiB) more; the FIFO and tmux's pipe are
//!   drained continuously.
//! - Records: at most `max_workers` live and `max_finished` terminal.
//! - Lifecycle streams: 64 events each, then a `Resync` is owed.
//! - Output streams: the output log's bounded stream per reader.
//! - Input: 1 MiB waiting per worker, plus the spawn's `stdin`.
//! - Every tmux command has 30 s, then its client is killed; a worker's output has 10 s
//!   to reach its end once its session is closed, then it is cut off there.
//!
//! # Leaks
//!
//! No error message, event, health message or `Debug` output of this crate names the
//! socket, a session or a path: a tmux failure is an `internal` error whose detail only
//! reaches the log, and the public types print counts and redacted fields.
#![warn(missing_docs)]

mod config;
mod error;
mod marker;
mod names;
mod source;
mod sys;
mod tmux;
mod worker;

use registry_core::{ConfigError, SourceConfig, SourceKind};

pub use config::{Profile, TmuxConfig, MAX_GRACE, MAX_SOCKET_NAME};
pub use source::TmuxSource;

/// The source kind this crate adds: `source = "tmux"` in a `[[runtimes]]` table.
pub const KIND: &str = "tmux";

/// A server adds the kind with `factories.add::<TmuxSource>()`.
impl SourceKind for TmuxSource {
    const KIND: &'static str = KIND;

    /// Parses the runtime's table as a [`TmuxConfig`] (an unknown key is an error naming
    /// it), defaults `socket_name` to `roster-<runtime name>`, keeps its files in the
    /// runtime's state directory, and starts the source; call it inside a tokio runtime.
    fn from_config(config: &SourceConfig) -> Result<Self, ConfigError> {
        let mut settings: TmuxConfig = config.parse()?;
        settings.problem().map_err(|(path, message)| {
            ConfigError::new(config.runtime_id.as_str(), message).at(path)
        })?;
        if settings.socket_name.is_none() {
            settings.socket_name =
                Some(TmuxConfig::default_socket_name(config.runtime_id.as_str()).into());
        }
        // An operator's message; an internal error's detail names no path here.
        TmuxSource::new(settings, config.state_dir.0.clone()).map_err(|e| config.build_error(e))
    }
}
