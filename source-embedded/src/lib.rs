//! # source-embedded
//!
//! The `embedded` source of Roster: a [`RuntimeSource`] over a
//! [`worker_runtime::Runtime`] in the same process, driven by direct library calls. Workers
//! are children of this process (each in its own process group) and die with it.
//!
//! A server adds the kind with `factories.add::<EmbeddedSource>()` (see
//! [`SourceKind`](registry_core::SourceKind)); the config table of each `embedded` runtime is
//! an [`EmbeddedConfig`]. The source can also be built directly:
//!
//! ```
//! use std::collections::BTreeMap;
//!
//! use registry_core::{OutputEvent, OutputRequest, RuntimeSource, SpawnRequest};
//! use source_embedded::{EmbeddedConfig, EmbeddedSource};
//! use worker_runtime::Profile;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), registry_core::RegistryError> {
//! let shell = Profile { command: vec!["/bin/sh".into(), "-c".into()], ..Default::default() };
//! let source = EmbeddedSource::new(EmbeddedConfig {
//!     profiles: BTreeMap::from([("shell".to_string(), shell)]),
//!     ..Default::default()
//! })?;
//!
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
#![warn(missing_docs)]

mod config;
mod error;
mod source;

use registry_core::{ConfigError, SourceConfig, SourceKind};

pub use config::EmbeddedConfig;
pub use source::EmbeddedSource;

/// The source kind this crate adds: `source = "embedded"` in a `[[runtimes]]` table.
pub const KIND: &str = "embedded";

/// A server adds the kind with `factories.add::<EmbeddedSource>()`. The factory parses the
/// runtime's table as an [`EmbeddedConfig`] (an unknown key is an error naming it) and
/// starts the runtime; build it inside a tokio runtime.
impl SourceKind for EmbeddedSource {
    const KIND: &'static str = KIND;

    fn from_config(config: &SourceConfig) -> Result<Self, ConfigError> {
        let settings: EmbeddedConfig = config.parse()?;
        settings.problem().map_err(|(path, message)| {
            ConfigError::new(config.runtime_id.as_str(), message).at(path)
        })?;
        // An operator's message: the runtime's own (which names no path or pid), also for
        // an internal error.
        EmbeddedSource::new(settings).map_err(|e| config.build_error(e))
    }
}
