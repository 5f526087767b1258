//! # registry-core
//!
//! The heart of Roster: the [`RuntimeSource`] trait every kind of runtime implements, the
//! registry's own identity for workers ([`WorkerId`], issued by [`IdIssuer`] from a keyed
//! hash), the public views ([`WorkerView`], [`RuntimeView`]), the one error type
//! ([`RegistryError`]), and the [`Registry`] itself with its event log.
//!
//! This crate knows no HTTP and no source kind: sources depend on it, never the other way.
//!
//! ```no_run
//! # async fn demo(source: std::sync::Arc<dyn registry_core::RuntimeSource>) -> Result<(), registry_core::RegistryError> {
//! use registry_core::{Registry, RegistryConfig, RuntimeId, SpawnRequest};
//!
//! let registry = Registry::new(RegistryConfig::new("./.roster"))?;
//! let local = RuntimeId::new("local")?;
//! registry.add_runtime(local.clone(), "embedded", source).await?;
//! let worker = registry
//!     .spawn(&local, SpawnRequest {
//!         command: Some(vec!["/bin/sh".into(), "-c".into(), "echo hi".into()]),
//!         ..Default::default()
//!     })
//!     .await?;
//! println!("{} is {}", worker.id, worker.state);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod error;
mod events;
mod factory;
pub mod fanout;
mod id;
mod model;
pub mod output_log;
mod redact;
mod registry;
mod sanitize;
mod source;
mod table;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use error::RegistryError;
pub use events::{
    Cursor, EventPayload, ResetReason, StreamItem, Subscription, MAX_SUBSCRIBER_QUEUE,
};
pub use factory::{de, ConfigError, SourceConfig, SourceFactories, SourceFactory, SourceKind};
pub use id::{IdIssuer, RuntimeId, SourceKey, WorkerId, KEY_FILE};
pub use model::{
    limits, ArgsRule, BackoffRequest, Capabilities, Diagnostic, FailReason, HealthState,
    HealthStatus, HealthView, LastExit, ProbeKind, ProfileView, Restart, RestartView, RuntimeView,
    SourceHealth, SourceWorker, SpawnRequest, StreamKind, WorkerHealth, WorkerState, WorkerView,
};
pub use redact::{Redacted, RedactedValues};
pub use registry::{Page, Registry, RegistryConfig, SharedPage, WorkerFilter, MAX_PAGE};
pub use sanitize::{sanitize_message, REDACTED};
pub use source::{
    OutputChunk, OutputEvent, OutputRequest, OutputStream, RuntimeSource, SourceEvent, SourceEvents,
};
