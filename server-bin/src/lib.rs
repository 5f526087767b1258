//! # server-bin
//!
//! The `roster` HTTP server as a library, and the `roster` binary around it: the API of
//! SPEC §4 over hyper 1.x, Server-Sent-Events streams, bearer tokens, the config file, metrics
//! and graceful shutdown.
//!
//! The same binary is the command-line client of that API ([`client`]: `roster ls`,
//! `roster logs -f`, `roster spawn -f -- make test`, …), a client of the public API only.
//!
//! A program with its own source kinds builds the default factories, adds its own, and hands
//! them to [`cli::main`] (the same command line as `roster`) or to [`run`]:
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     let mut factories = server_bin::default_factories();
//!     // factories.add::<my_source::MySource>().expect("a kind added once");
//!     server_bin::cli::main(factories)
//! }
//! ```
//!
//! `roster serve --config FILE` reloads the file on `SIGHUP` and `POST /v1/admin/reload`
//! (see [`ReloadConfig`] and docs/DESIGN.md): runtimes added, changed and removed without
//! a restart, and a file that does not validate changes nothing.
//!
//! Tests start the real server on `127.0.0.1:0` with [`serve`] or [`serve_with`].
#![warn(missing_docs)]

mod api;
mod auth;
pub mod cli;
pub mod client;
pub mod config;
mod error;
pub mod metrics;
mod reload;
pub mod routes;
mod server;
mod sse;
mod wire;

use std::future::Future;

use anyhow::Context as _;
use registry_core::{Registry, RegistryConfig, SourceFactories};
use tokio::net::TcpListener;

pub use api::OPENAPI;
pub use config::Config;
pub use error::ERRORS;
pub use reload::{ReloadConfig, ReloadOutcome};
pub use server::{serve, serve_with, ServeOptions};

/// The source kinds that ship with `roster`: `embedded`, `remote`, `local`, `docker` and
/// `slurm`.
pub fn default_factories() -> SourceFactories {
    let mut factories = SourceFactories::new();
    factories
        .add::<source_embedded::EmbeddedSource>()
        .expect("a fresh set of kinds has no embedded yet");
    factories
        .add::<source_remote::RemoteSource>()
        .expect("a fresh set of kinds has no remote yet");
    factories
        .add::<source_local::LocalSource>()
        .expect("a fresh set of kinds has no local yet");
    factories
        .add::<source_docker::DockerSource>()
        .expect("a fresh set of kinds has no docker yet");
    factories
        .add::<source_slurm::SlurmSource>()
        .expect("a fresh set of kinds has no slurm yet");
    factories
}

/// The registry a config describes, with every runtime added.
pub async fn build_registry(
    config: &Config,
    factories: &SourceFactories,
) -> anyhow::Result<Registry> {
    let s = &config.server;
    let registry = Registry::new(RegistryConfig {
        state_dir: s.state_dir.clone(),
        event_retention: s.event_retention,
        event_retention_bytes: usize::try_from(s.event_retention_bytes).unwrap_or(usize::MAX),
        subscriber_queue: s.subscriber_queue,
    })
    .context("opening the state directory")?;
    for rt in config.build_sources(factories)? {
        registry
            .add_runtime(rt.id.clone(), &rt.kind, rt.source)
            .await
            .with_context(|| format!("adding runtime {:?}", rt.id.as_str()))?;
    }
    Ok(registry)
}

/// Runs `roster` with this config until SIGTERM or SIGINT, then shuts down gracefully.
pub async fn run(config: Config, factories: SourceFactories) -> anyhow::Result<()> {
    run_until(config, factories, shutdown_signal()).await
}

/// [`run`], until `shutdown` completes.
pub async fn run_until(
    config: Config,
    factories: SourceFactories,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run_reloadable(config, factories, None, shutdown).await
}

/// [`run_until`], with the config reloadable from `reload` (`POST /v1/admin/reload`, and
/// `SIGHUP` if `reload.on_sighup`). Its `running` is set to `config`, the one the server
/// starts with.
pub async fn run_reloadable(
    config: Config,
    factories: SourceFactories,
    reload: Option<ReloadConfig>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let tokens = config.load_tokens()?;
    config.check_listen(&tokens)?;
    let listener = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("listening on {}", config.server.listen))?;
    let registry = build_registry(&config, &factories).await?;
    tracing::info!(
        listen = %listener.local_addr()?,
        runtimes = config.runtimes.len(),
        tokens = tokens.len(),
        "roster is serving"
    );
    let options = ServeOptions {
        reload: reload.map(|r| ReloadConfig {
            running: config.clone(),
            ..r
        }),
        ..ServeOptions::from_config(&config.server, tokens)
    };
    serve_with(listener, registry, options, shutdown).await
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = int.recv() => tracing::info!("SIGINT"),
            }
        }
        _ => {
            tracing::error!("no signal handlers; stopping only on Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
