//! # source-remote
//!
//! The `remote` source of Roster: one runtime of another `roster` process, reached through
//! its public HTTP + SSE API (hyper's client). Because the other process serves this same
//! API, registries stack: a registry can front registries.
//!
//! - **Following.** The source opens the remote's `/v1/events?runtime=…`. The first answer
//!   is a `snapshot`: the whole truth, consistent with the stream's cursor (a separate
//!   list call could not be). After that it applies `worker.upserted`, `worker.removed`
//!   and `runtime.updated`, keeps the cursor, and on reconnect resumes with
//!   `Last-Event-ID`. A `reset` (the remote restarted, or the cursor expired) is followed
//!   by a fresh snapshot, handed to the registry as a `Resync`.
//! - **Identity.** Each worker is keyed by its id on the remote; the registry issues its
//!   own id from that key, so remote ids never reach a client, and ids stay the same
//!   across outages.
//! - **Outages.** A transport error, or silence on the event stream for longer than
//!   `heartbeat_timeout`, marks the runtime `unavailable` (with `retry_at`) at once; live
//!   workers turn `unknown` with `last_seen_at`. Spawn, input, stop, remove and opening
//!   output answer `runtime_unavailable` with a `Retry-After` meanwhile. The source
//!   reconnects with exponential backoff and full jitter (`backoff_base`, doubling up to
//!   `backoff_cap`). On heal, workers get their states back and the events missed are
//!   replayed from the cursor.
//! - **A restarted remote.** Workers the restarted remote no longer knows become `failed`
//!   with reason `lost` if they were live, and are removed `retain_lost` (default 1 h)
//!   later; ended ones are removed at once, as the remote removed them.
//! - **Output.** `/v1/workers/{id}/output?after=<seq>` is proxied keeping the worker's own
//!   `seq`, so resuming works through any number of hops. Readers of one worker share one
//!   upstream stream (which keeps the last 1 MiB).
//! - **Errors.** The remote's error codes keep their meaning; transport failures become
//!   `runtime_unavailable` or `upstream_timeout`. No message names the remote's address,
//!   token, runtime name or ids.
//! - **Why it is down.** The runtime's health message says which failure it is, in words
//!   that point at the setting to check: the connection refused (nothing listens at `url`),
//!   the host name not resolved (DNS), the connect timed out (`connect_timeout`), an answer
//!   that is not plain HTTP (a TLS port), the connection closed before an answer, no answer
//!   within `request_timeout`, `401` (the token: `token_env` / `token_file`), `403` (the
//!   other roster's `allowed_hosts`, or the token), `404 runtime_not_found` (the
//!   `remote_runtime` name). The log is the operator's: one `warn` line when the runtime goes
//!   down and one per change of reason, with the runtime, the remote's `address` and the
//!   transport's own `cause`; a retry that fails the same way is a `debug` line; an `info`
//!   line says when the remote answers again.
#![warn(missing_docs)]

mod client;
mod config;
mod output;
mod source;
mod sse;
mod stream;

use std::time::Duration;

use registry_core::{ConfigError, SourceConfig, SourceKind};

pub use client::{api_request, BuildError, ErrorAnswer};
pub use config::RemoteConfig;
pub use source::RemoteSource;
pub use sse::{Event as SseEvent, Item as SseItem, Parser as SseParser, TooLarge};
pub use stream::{Backoff, EventReader, ReadError};

/// The source kind this crate adds: `source = "remote"` in a `[[runtimes]]` table.
pub const KIND: &str = "remote";

/// How long a worker lost in a restart of the remote stays listed as `failed (lost)`.
pub const RETAIN_LOST: Duration = Duration::from_secs(3600);

/// A server adds the kind with `factories.add::<RemoteSource>()`.
impl SourceKind for RemoteSource {
    const KIND: &'static str = KIND;

    /// Parses and checks the table (an unknown key is an error naming it) and reads the
    /// token. Inside a tokio runtime it starts following the remote at once; otherwise
    /// when first asked.
    fn from_config(config: &SourceConfig) -> Result<Self, ConfigError> {
        let parsed: RemoteConfig = config.parse()?;
        let runtime = config.runtime_id.to_string();
        let settings = parsed.settings(&runtime)?;
        let retain = parsed.retain_lost;
        Ok(RemoteSource::new(&runtime, settings, retain))
    }
}
