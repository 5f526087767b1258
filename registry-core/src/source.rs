//! The `RuntimeSource` trait: the contract between the registry and a kind of runtime.

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::{
    Capabilities, ProfileView, RegistryError, SourceConfig, SourceHealth, SourceKey, SourceWorker,
    SpawnRequest, StreamKind,
};

/// A change a source reports on its lifecycle stream.
// Most events are upserts, each moved once through a channel: boxing them would add an
// allocation per event and a `Box` to every source's code, to save room in the rare others.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum SourceEvent {
    /// A worker is new or changed. Sending the same worker twice is harmless.
    Upsert(SourceWorker),
    /// A worker's record is gone.
    Removed(SourceKey),
    /// "Here is the whole truth again": every worker the source has. Any worker the
    /// registry knew in this runtime that is not in the list is gone.
    Resync(Vec<SourceWorker>),
    /// Health changed.
    Health(SourceHealth),
}

/// A source's lifecycle stream, as returned by [`RuntimeSource::events`].
pub type SourceEvents = mpsc::Receiver<SourceEvent>;

/// One item of a worker's output stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputEvent {
    /// A chunk of output, raw bytes as the worker wrote them.
    Chunk(OutputChunk),
    /// Chunks `from..=to` are no longer retained.
    Gap {
        /// First lost seq.
        from: u64,
        /// Last lost seq.
        to: u64,
    },
    /// The worker is terminal and every retained chunk after the start point was sent.
    /// Nothing follows it.
    End,
}

/// A chunk of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    /// Per-worker sequence: starts at 1, never repeats, never has holes.
    pub seq: u64,
    /// Which stream.
    pub stream: StreamKind,
    /// The bytes, unchanged (they need not be UTF-8 nor end at a line break).
    pub data: Bytes,
}

/// An output stream, as returned by [`RuntimeSource::output`].
pub type OutputStream = mpsc::Receiver<OutputEvent>;

/// Where an output stream starts, and whether it follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputRequest {
    /// Send chunks with `seq > after` (0: from the start).
    pub after: u64,
    /// Keep following new output until the worker ends (`true`), or send what is retained
    /// now and close (`false`).
    pub follow: bool,
}

/// A kind of place that runs workers, behind one runtime of the registry.
///
/// # The contract
///
/// **Keys.** A source names each worker by a [`SourceKey`] of its own choosing. The key is
/// internal authority: the registry never shows it, and derives the public worker id from it.
/// A key must stay the same for the life of the worker (also across reconnects of the source)
/// and should not be reused for another worker, also after a restart of the process.
///
/// **Unknown keys.** Every method that takes a key returns
/// [`RegistryError::WorkerNotFound`] for a key the source does not know (or no longer
/// knows). The registry replaces the message, so it needs no detail.
///
/// **Capabilities.** [`capabilities`](Self::capabilities) is data and must not change over the
/// life of the source. An operation whose capability is false returns
/// [`RegistryError::Unsupported`] and does nothing. The registry checks first, but a source
/// must not rely on it.
///
/// **States.** A worker moves `starting → running → stopping → exited | stopped | failed`, any
/// non-terminal state may become `unknown` while the source has lost contact and come back from
/// it. Once `exited`, `stopped` or `failed`, a worker never changes state again.
///
/// **Errors.** Messages are for people and carry no internal authority (the registry scrubs
/// them again). Transport trouble is `RuntimeUnavailable` or `UpstreamTimeout`; anything
/// unexpected is `Internal`, whose detail only reaches the log.
///
/// **Concurrency.** Every method may be called concurrently from many tasks. None may block
/// the thread; none may wait on a client's stream being read.
#[async_trait]
pub trait RuntimeSource: Send + Sync + Debug + 'static {
    /// What this source can do. Constant for the life of the source.
    fn capabilities(&self) -> Capabilities;

    /// Current health. Cheap; called when the runtime is added and whenever the registry
    /// wants a fresh answer. Changes should also be sent as [`SourceEvent::Health`].
    async fn health(&self) -> SourceHealth;

    /// Every worker the source has now, terminal ones whose records are retained included.
    async fn list(&self) -> Result<Vec<SourceWorker>, RegistryError>;

    /// One worker. `WorkerNotFound` for an unknown key.
    async fn get(&self, key: &SourceKey) -> Result<SourceWorker, RegistryError>;

    /// Starts a worker and returns it (in `starting`, `running`, or — when the process could
    /// not be started — `failed` with reason `spawn_failed`).
    ///
    /// The source validates the request against its config: an unknown profile is
    /// `InvalidRequest`, a command where commands are not allowed is `Forbidden`, a full
    /// runtime is `CapacityExceeded`. With a `request_id` the call is idempotent: the same id
    /// with the same request returns the same worker, with another request it is `Conflict`.
    /// Without the `spawn` capability: `Unsupported`.
    async fn spawn(&self, request: SpawnRequest) -> Result<SourceWorker, RegistryError>;

    /// Asks a worker to stop: SIGTERM (or the source's equivalent) now, a hard kill once
    /// `grace` (or the source's default) has passed. Returns once the request is made, not
    /// when the worker has ended; the end shows on the lifecycle stream as `stopped`.
    /// Stopping a terminal worker, or one already stopping, is a no-op that succeeds.
    async fn stop(&self, key: &SourceKey, grace: Option<Duration>) -> Result<(), RegistryError>;

    /// Writes `data` to the worker's stdin. `Conflict` once the worker no longer takes
    /// input (terminal, or its stdin closed); `CapacityExceeded` when the source's bounded
    /// input queue for that worker is full.
    async fn input(&self, key: &SourceKey, data: Bytes) -> Result<(), RegistryError>;

    /// Removes a terminal worker's record (and its retained output) at once, and reports it
    /// as [`SourceEvent::Removed`]. `Conflict` while the worker is not terminal.
    async fn remove(&self, key: &SourceKey) -> Result<(), RegistryError>;

    /// Opens the lifecycle stream.
    ///
    /// The **first** event is a [`SourceEvent::Resync`] with the whole truth at that moment;
    /// every change after it follows in order. The stream is bounded: a source never blocks
    /// on a slow reader. When it cannot deliver a change (its buffer overflowed, it lost its
    /// upstream), it must later send a fresh `Resync` with the whole truth, from which the
    /// registry reconciles. Losing track silently is the one thing a source must never do.
    /// The stream ends when the source is shut down; the registry may open a new one.
    async fn events(&self) -> Result<SourceEvents, RegistryError>;

    /// Opens a worker's output stream from `request.after`.
    ///
    /// Chunks come in `seq` order, with no holes: where retained output no longer holds the
    /// next `seq`, an [`OutputEvent::Gap`] says which were lost before the next chunk. Once
    /// the worker is terminal and its retained output is sent, [`OutputEvent::End`] comes last
    /// and the stream closes. With `follow: false` the stream closes after what is retained
    /// now (with `End` only if the worker is already terminal). The stream is bounded; a slow
    /// reader slows only its own stream.
    async fn output(
        &self,
        key: &SourceKey,
        request: OutputRequest,
    ) -> Result<OutputStream, RegistryError>;

    /// The spawn profiles a request may name, and what a request may pass to each
    /// ([`ProfileView`]): never a profile's environment, working directory, or command line
    /// unless the config says to show it. Sorted by name. A source that runs another
    /// registry's workers answers that registry's list for its runtime.
    ///
    /// The default answers no profiles: right for a kind that cannot spawn, or has no
    /// profiles; a kind with profiles overrides it (the conformance suite does not check it).
    async fn profiles(&self) -> Result<Vec<ProfileView>, RegistryError> {
        Ok(Vec::new())
    }

    /// Called once when the registry shuts down. A source that owns its workers (they run
    /// as its children) stops every live one as [`stop`](Self::stop) would, each with its own
    /// grace cut to `grace` when one is given, and returns when all are terminal. A source that only observes
    /// workers someone else owns (another registry, an older launcher) lets go of its
    /// connections and leaves the workers running. Afterwards its streams end.
    async fn shutdown(&self, grace: Option<Duration>);

    /// Takes a changed config of this runtime (a reload of the config file) without
    /// stopping anything, where the kind can: `Ok(true)` once the new config is in force —
    /// every worker keeps running under the same key, open streams stay open, and the
    /// capabilities are unchanged. `Ok(false)` when this change cannot be taken in place; the
    /// registry then replaces the source with one built from the new config (shutting this
    /// one down as [`shutdown`](Self::shutdown) does). Nothing may have changed when it
    /// returns `Ok(false)` or an error.
    ///
    /// A reload calls it only with a `config` the kind's factory has already built a source
    /// from, so the table is known to be valid; an error here is logged and the runtime is
    /// replaced instead.
    ///
    /// The default is `Ok(false)`: a kind that does not say otherwise is replaced, which is
    /// always correct, only less gentle.
    async fn reconfigure(&self, config: &SourceConfig) -> Result<bool, RegistryError> {
        let _ = config;
        Ok(false)
    }
}
