//! # source-local
//!
//! The `local` source of Roster: a [`RuntimeSource`] over workers that an **older launcher**
//! started on this host. Such a launcher leaves a descriptor file per worker in a spool
//! directory; this source follows the directory, checks that each pid is still the process
//! the descriptor names, tails its log as output, writes input to its socket, and stops it
//! by signal. It cannot spawn: its capabilities say so, and `spawn` is `unsupported`.
//!
//! ```no_run
//! use registry_core::RuntimeSource;
//! use source_local::{LocalConfig, LocalSource};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), registry_core::RegistryError> {
//! let source = LocalSource::new(LocalConfig::new("/run/legacy-workers"))?;
//! for worker in source.list().await? {
//!     println!("{:?} is {}", worker.name, worker.state);
//! }
//! source.shutdown(None).await; // the workers keep running: they are not ours
//! # Ok(()) }
//! ```
//!
//! In a config file: `source = "local"` and a [`LocalConfig`] table.
//!
//! ## Descriptors
//!
//! Any `<name>.json` in `spool_dir` (a regular file, or a symlink to one) is a descriptor:
//! a JSON object with `pid` (an integer), `started_at` (RFC 3339, the process's start time
//! to the second), and optionally `name`, `socket` (a Unix socket that takes input) and
//! `log` (the file the output goes to). `socket` and `log` may be relative to the spool
//! directory. Other fields are accepted and ignored (an older launcher may write more). A
//! missing or mistyped `pid` or `started_at`, a mistyped optional field, or bad JSON makes
//! the file **malformed**; other files are not touched by it. The launcher should write a
//! descriptor atomically (a temporary name that does not end in `.json`, then a rename); a
//! file caught half-written is a diagnostic until its next change.
//!
//! ## Following the directory
//!
//! An inotify watch (through `notify`) on `spool_dir` wakes a rescan on every change of a
//! `*.json` entry (after a 10 ms debounce, so a burst costs one scan). A rescan lists the
//! directory and `stat`s each descriptor (following symlinks), and reads only those whose
//! (device, inode, size, mtime, ctime) changed. A rescan also runs every `poll_interval`
//! (default 500 ms) whatever inotify says: it is the fallback where no watch can be had
//! (no inotify, the directory missing or replaced — the watch is made again when its
//! inode changes — or `watch = false` for file systems inotify does not see). So a new,
//! changed or removed descriptor is seen within `poll_interval`, and at once with inotify.
//!
//! A missing `spool_dir` makes the runtime `unavailable` (with a `spool_dir_missing`
//! diagnostic; no message names the path), looked for again every `poll_interval` (at
//! most every second); once it is there the runtime is `ready`. Records are kept while the
//! directory is missing, so a directory that is briefly gone drops nothing; when it is
//! back, what is no longer in it goes.
//!
//! ## Workers and their keys
//!
//! Each descriptor names one worker, keyed by a hash of the descriptor's file name, its
//! `pid` and its `started_at` (to the second): a descriptor rewritten for another process
//! is another worker (the old one is removed), one rewritten for the same process (a new
//! `name` or `socket`) is the same worker. The key reveals none of them. The worker's
//! `created_at` and `started_at` are the descriptor's `started_at`; it has no labels,
//! profile or command.
//!
//! ## Liveness
//!
//! A process is the descriptor's when it is alive (not a zombie) and its start time — field
//! 22 of `/proc/<pid>/stat` (clock ticks since boot; `sysconf(_SC_CLK_TCK)`) plus `btime`
//! from `/proc/stat` — is within one second of `started_at`. One second, because `btime` is
//! itself whole seconds and both sides are cut to the second. A step of the system clock
//! shifts `btime`; after a step of more than a second a worker's process no longer matches
//! and is taken for ended — the safe side: a process this source can't vouch for is never
//! shown running and never signalled.
//!
//! When a descriptor is first seen, a pidfd is opened (`pidfd_open`) and *then* the start
//! time is checked: if it matches, the fd was opened on that very process and names it for
//! good. The pidfd turns readable when the process ends (it need not be our child), which
//! tokio's reactor reports. Without pidfds (an old kernel), `/proc` is looked at every
//! `poll_interval` instead.
//!
//! ## States
//!
//! - A live, matching process: `running`.
//! - Its end: `exited` with **no exit code** (`exit_code: null`): the process is not our
//!   child, so its exit status is its parent's to read, not ours. If a stop had been asked
//!   for, it is `stopped` instead.
//! - A descriptor whose pid is already gone, is a zombie, or is another process (its start
//!   time differs — the pid was reused) when first seen: `exited`, exit code unknown,
//!   `ended_at` = when it was noticed. It is never shown `running` and never signalled.
//! - A worker turns terminal once its log has been read to the end, so that an ended
//!   worker's output is complete when it shows as ended (a worker found ended is listed
//!   once its log is read in).
//!
//! Ended records stay until their descriptor is removed, `DELETE` removes them, or
//! `retain_finished` (default 1 h, from the end) passes. A removed record's descriptor is
//! remembered as dismissed (file name, pid and start time), so it does not come back while
//! that same descriptor stays; the file itself is left alone (it is the launcher's). A
//! removed descriptor file removes its worker, live or not, and ends its output streams.
//!
//! ## Stopping
//!
//! `stop` checks that the process has not ended (the pidfd says so) and that this server may
//! signal it, turns the worker `stopping`, and sends SIGTERM; after `grace` (the request's
//! or the config's) SIGKILL, again only if the pidfd says the process has not ended. A
//! process that leads its own process group (`getpgid(pid) == pid`, as launchers start
//! them) is signalled as a group with `kill(-pid)`, after the pidfd check, so its children
//! go too; otherwise the signal goes through the pidfd (`pidfd_send_signal`) to that process
//! alone. The one race left: the group id is the leader's pid, which can't be reused while
//! the leader or any member of its group lives; between the pidfd's answer and the
//! `kill(-pid)`, the leader would have to end, its group empty, and a new group leader be
//! given that pid. Without pidfds, `/proc` is checked just before each signal, with the
//! same window. Stopping a terminal or stopping worker is a no-op that succeeds.
//!
//! ## Output
//!
//! Each worker's output is an [`OutputLog`](registry_core::output_log::OutputLog) keeping
//! at least `output_retention` bytes (plus one chunk of at most 64 KiB). A task tails the
//! `log` file: from offset 0 to its end in reads of 64 KiB (never splitting a UTF-8
//! character), then follows it, woken by inotify events for the log's directory or every
//! 100 ms while the worker lives. All of it is the `stdout` stream: the log mixes stdout and
//! stderr, and their order within it is the order they were written.
//!
//! - **Truncation** (the file is now shorter than what was read): reading starts again at 0.
//!   A log truncated and written past the old length before the next look reads on from the
//!   old offset; a log not written with `O_APPEND` leaves a hole of NUL bytes after a
//!   truncation (that is the file's content).
//! - **Rotation** (the path now names another file): the old file is read to its end, then
//!   the new one from 0.
//! - **The end**: once the process has ended, the log is read to its end once more (as far
//!   as it reaches at that moment), and the output gets `End` after the last chunk.
//! - A worker without `log` has no output and gets `End` once terminal. A log that can't be
//!   opened while the worker lives is a `log_unreadable` diagnostic; the worker stays.
//! - **Seqs are per roster process**: nothing is persisted, so after a restart of roster the
//!   log is read again from its start and numbered afresh from 1.
//!
//! ## Input
//!
//! `input` connects to the worker's `socket` (a Unix stream socket), keeps the connection
//! per worker, and writes the bytes within 5 s, one writer at a time per worker. A kept
//! connection that broke is replaced once (the bytes are sent again on the new one). A
//! worker without `socket`: `unsupported` ("this worker takes no input"). A socket gone or
//! refusing while the process lives: `conflict` ("the worker no longer takes input"). An
//! ended worker: `conflict`. Not taken within 5 s: `capacity_exceeded`.
//!
//! ## Diagnostics
//!
//! Problems show as the runtime's diagnostics; while there are any (and the directory can
//! be read) the runtime is `degraded` — it answers, with problems — and `ready` again once
//! they are fixed. Codes:
//! `descriptor_malformed` (which field, and what is wrong with it, never its value),
//! `descriptor_unreadable` (an I/O error; a directory or a dangling symlink named
//! `*.json`), `descriptor_too_large` (over `max_descriptor_bytes`), `too_many_workers`
//! (descriptors waiting for room under `max_workers`, or past the file table's bound),
//! `spool_dir_missing` / `spool_dir_unreadable`, `log_unreadable`. No message holds a path
//! or a file name: a descriptor is named by a number (`descriptor #3`) given in the order
//! this server found them and kept while the file is there; the server's log (at `warn`)
//! names the file of each number. Fixing a file clears its diagnostic. At most
//! 64 are reported; the last then says how many more there are.
//!
//! ## Bounds
//!
//! - Worker records: `max_workers` (live and ended). Output: `output_retention` + 64 KiB
//!   per worker.
//! - Descriptor files tracked: `max_workers` + 4096, the first by name; the rest
//!   are counted in a diagnostic, not read. A descriptor read: `max_descriptor_bytes`.
//! - Lifecycle streams: 256 events each; a reader that falls behind gets
//!   nothing more until a fresh `Resync` (and the health) fits, which it then gets.
//! - Output streams: the output log's own bound per reader.
//! - inotify events queue nothing: each sets a wake-up.
//! - Input: one connection per worker; the bytes of one call (the HTTP body bound).
//!
//! ## Trust
//!
//! The spool directory is trusted as the old launcher's own: whoever can write a descriptor
//! into it can make this server read the file it names as `log` (and serve it as output),
//! write clients' input to the socket it names, and signal the process it names (once its
//! start time matches), all with this server's rights. Keep the directory writable only by
//! the launcher's user, as the old launchers required.
//!
//! ## Shutting down
//!
//! `shutdown` stops following: the tasks end, output streams of live workers end without
//! `End`, lifecycle streams end. The processes keep running: they are the launcher's.
#![warn(missing_docs)]

mod config;
mod descriptor;
mod error;
mod procfs;
mod source;
mod spool;
mod tail;
mod watch;

use registry_core::{ConfigError, SourceConfig, SourceKind};

pub use config::{LocalConfig, MIN_POLL_INTERVAL};
pub use source::LocalSource;

/// The source kind this crate adds: `source = "local"` in a `[[runtimes]]` table.
pub const KIND: &str = "local";

/// A server adds the kind with `factories.add::<LocalSource>()`.
impl SourceKind for LocalSource {
    const KIND: &'static str = KIND;

    /// Parses and checks the table (an unknown key or a bad value is an error naming the
    /// key) and starts following the spool directory. Call it inside a tokio runtime.
    fn from_config(config: &SourceConfig) -> Result<Self, ConfigError> {
        let settings: LocalConfig = config.parse()?;
        let settings = settings.checked(&config.runtime_id)?;
        LocalSource::new(settings).map_err(|e| config.build_error(e))
    }
}
