//! Reloading the config file while `roster` runs (`SIGHUP`, `POST /v1/admin/reload`,
//! `roster reload`): the new file is read and checked whole — every source it adds or
//! changes is built — before anything changes; then runtimes are added, changed (in place
//! where the source can, else replaced) and removed, and the token set and the allowed
//! hosts and origins are swapped. A file that does not validate changes nothing.
//!
//! What a reload does not change: `[server]` keys the running server was built with
//! (`listen`, `state_dir`, body and event limits, grace, ping) are reported as needing a
//! restart and keep their running values, reload after reload, until the restart.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use registry_core::{
    sanitize_message, Redacted, RegistryError, RuntimeId, SourceConfig, SourceFactories,
};
use serde::Serialize;
use tokio::sync::Mutex;

use crate::auth::{is_loopback, Tokens};
use crate::config::{BuiltRuntime, Config, ConfigFileError, RuntimeSection};
use crate::server::{App, Gate};

/// Where a running server reloads its config from.
#[derive(Clone, Debug)]
pub struct ReloadConfig {
    /// The config file, read again at every reload; `None` for a server started without
    /// one (a reload is then refused with `409 conflict`, and `SIGHUP` only logs that).
    pub path: Option<Redacted<PathBuf>>,
    /// `--listen`, which overrides the file at every reload as it did at the start.
    pub listen: Option<SocketAddr>,
    /// `--state-dir`, likewise.
    pub state_dir: Option<Redacted<PathBuf>>,
    /// The source kinds new runtimes are built with.
    pub factories: SourceFactories,
    /// The config the server runs now (the file as it was read at the start, with the flags).
    pub running: Config,
    /// Whether `SIGHUP` reloads. `roster serve` sets it; a server inside a test leaves the
    /// process's signals alone.
    pub on_sighup: bool,
}

/// What a reload did, by public runtime id (each list in config order; `removed` in the
/// order of the old file).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReloadOutcome {
    /// Runtimes new in the file: started.
    pub added: Vec<RuntimeId>,
    /// Runtimes gone from the file: their workers were stopped (or, for a kind that only
    /// observes workers, let go) and removed, then the runtime.
    pub removed: Vec<RuntimeId>,
    /// Runtimes whose table changed, in place or replaced.
    pub changed: Vec<RuntimeId>,
    /// The changed runtimes whose source could not take the change in place and was
    /// replaced: an owning kind's workers were stopped and removed.
    pub replaced: Vec<RuntimeId>,
    /// Runtimes whose table is the same: not touched.
    pub unchanged: Vec<RuntimeId>,
    /// `[server]` keys that changed and are in force now (`server.tokens`,
    /// `server.allowed_hosts`, `server.allowed_origins`).
    pub applied: Vec<&'static str>,
    /// `[server]` keys that changed but take a restart; the running values stay.
    pub needs_restart: Vec<&'static str>,
}

/// A running server's reload state; reloads run one at a time.
#[derive(Debug)]
pub(crate) struct Reloader {
    config: ReloadConfig,
    /// What is in force, changed by each reload that succeeds.
    running: Mutex<Running>,
    /// The address the server listens on: without tokens it must be loopback.
    local: SocketAddr,
}

/// The config in force and its token set (as hashes: a token file's text may have changed
/// since it was read, so the comparison is with what was read then).
#[derive(Debug)]
struct Running {
    config: Config,
    tokens: Tokens,
}

impl Reloader {
    /// `tokens` are the ones the server was started with.
    pub(crate) fn new(config: ReloadConfig, tokens: Tokens, local: SocketAddr) -> Reloader {
        Reloader {
            running: Mutex::new(Running {
                config: config.running.clone(),
                tokens,
            }),
            config,
            local,
        }
    }

    pub(crate) fn on_sighup(&self) -> bool {
        self.config.on_sighup
    }

    /// The file with the flags applied, as at the start.
    fn read(&self, path: &std::path::Path) -> Result<Config, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            tracing::error!(path = %path.display(), error = %e, "cannot read the config file");
            file_error(format!("cannot read the config file: {e}"))
        })?;
        let mut config = Config::parse(&text)?;
        if let Some(listen) = self.config.listen {
            config.server.listen = listen;
        }
        if let Some(dir) = &self.config.state_dir {
            config.server.state_dir = dir.clone();
        }
        Ok(config)
    }
}

/// An error of the file as a whole, without a line.
fn file_error(message: String) -> ConfigFileError {
    ConfigFileError {
        line: None,
        message,
    }
}

/// How a runtime of the new file relates to the running one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    Added,
    Changed,
    Unchanged,
}

fn change_of(new: &RuntimeSection, running: &[RuntimeSection]) -> Change {
    match running.iter().find(|r| r.id == new.id) {
        None => Change::Added,
        Some(old) if old.kind == new.kind && old.table == new.table => Change::Unchanged,
        Some(_) => Change::Changed,
    }
}

/// Reloads the config file of the server `app` serves. `Conflict` when the server has no
/// config file; `InvalidRequest`, naming the line and the key, when the file does not
/// validate — then nothing changed. The outcome and any error are logged.
pub(crate) async fn reload(app: &App) -> Result<ReloadOutcome, RegistryError> {
    let Some((reloader, path)) = app
        .reloader
        .as_ref()
        .and_then(|r| Some((r, r.config.path.as_deref()?)))
    else {
        let message = "this server was started without a config file (--config): there is \
                       nothing to reload";
        tracing::warn!("reload refused: {message}");
        return Err(RegistryError::Conflict(message.into()));
    };
    let mut running = reloader.running.lock().await;
    match prepare(reloader, path, &running.config, &running.tokens).await {
        Ok(plan) => {
            let outcome = apply(app, plan, &mut running).await;
            tracing::info!(
                added = ?ids(&outcome.added),
                removed = ?ids(&outcome.removed),
                changed = ?ids(&outcome.changed),
                replaced = ?ids(&outcome.replaced),
                unchanged = outcome.unchanged.len(),
                applied = ?outcome.applied,
                needs_restart = ?outcome.needs_restart,
                "config reloaded"
            );
            Ok(outcome)
        }
        Err(e) => {
            tracing::error!(error = %e, "config reload refused; the running config stays");
            Err(RegistryError::InvalidRequest(format!(
                "the config does not validate, nothing changed: {}",
                sanitize_message(&e.to_string())
            )))
        }
    }
}

fn ids(list: &[RuntimeId]) -> Vec<&str> {
    list.iter().map(RuntimeId::as_str).collect()
}

/// A checked reload, ready to apply: nothing can fail any more but a source's own work.
struct Plan {
    new: Config,
    tokens: Tokens,
    gate: Option<Gate>,
    built: Vec<(BuiltRuntime, Change)>,
    removed: Vec<RuntimeId>,
    unchanged: Vec<RuntimeId>,
    applied: Vec<&'static str>,
    needs_restart: Vec<&'static str>,
}

/// Reads and checks the new file whole, building every source it adds or changes.
async fn prepare(
    reloader: &Reloader,
    path: &std::path::Path,
    running: &Config,
    running_tokens: &Tokens,
) -> Result<Plan, ConfigFileError> {
    let new = reloader.read(path)?;
    let tokens = new.load_tokens()?;
    if tokens.is_empty() && !is_loopback(reloader.local.ip()) {
        return Err(file_error(
            "a config without [[server.tokens]] on a server that listens on a non-loopback \
             address would let anyone who reaches the port start processes; keep a token"
                .into(),
        ));
    }

    let (s, r) = (&new.server, &running.server);
    let mut needs_restart = Vec::new();
    // Every `[server]` key that a running server reads once, at start.
    macro_rules! differing {
        ($($key:ident),* $(,)?) => {
            [$((concat!("server.", stringify!($key)), s.$key != r.$key)),*]
        };
    }
    let restart_keys = differing!(
        listen,
        state_dir,
        max_body,
        shutdown_grace,
        sse_ping,
        event_retention,
        event_retention_bytes,
        subscriber_queue,
        max_connections,
        max_connections_per_peer,
        max_unauthenticated_connections,
        header_read_timeout,
        keep_alive_idle_timeout,
        max_header_bytes,
        max_headers,
        max_streams,
        max_streams_per_token,
    );
    for (key, differs) in restart_keys {
        if differs {
            needs_restart.push(key);
        }
    }
    let new_tokens = Tokens::new(&tokens);
    let mut applied = Vec::new();
    if new_tokens != *running_tokens {
        applied.push("server.tokens");
    }
    if s.allowed_hosts != r.allowed_hosts {
        applied.push("server.allowed_hosts");
    }
    if s.allowed_origins != r.allowed_origins {
        applied.push("server.allowed_origins");
    }
    let gate = (!applied.is_empty()).then(|| Gate::new(new_tokens, s));
    let tokens = Tokens::new(&tokens);

    // New sources are built in the running state directory (a new one takes a restart).
    let to_build: Vec<(RuntimeSection, Change)> = new
        .runtimes
        .iter()
        .map(|rt| (rt.clone(), change_of(rt, &running.runtimes)))
        .filter(|(_, c)| *c != Change::Unchanged)
        .collect();
    let building = Config {
        server: running.server.clone(),
        runtimes: to_build.iter().map(|(rt, _)| rt.clone()).collect(),
    };
    let built = building.build_sources(&reloader.config.factories)?;
    let built = built
        .into_iter()
        .zip(to_build.iter().map(|(_, c)| *c))
        .collect();
    let unchanged = new
        .runtimes
        .iter()
        .filter(|rt| change_of(rt, &running.runtimes) == Change::Unchanged)
        .map(|rt| rt.id.clone())
        .collect();
    let removed = running
        .runtimes
        .iter()
        .filter(|old| !new.runtimes.iter().any(|rt| rt.id == old.id))
        .map(|old| old.id.clone())
        .collect();
    Ok(Plan {
        new,
        tokens,
        gate,
        built,
        removed,
        unchanged,
        applied,
        needs_restart,
    })
}

/// Applies a checked reload. Every runtime change runs at once; the call returns when all
/// are done (removals and replacements within the workers' grace).
async fn apply(app: &App, plan: Plan, in_force: &mut Running) -> ReloadOutcome {
    let new = plan.new;
    if let Some(gate) = plan.gate {
        app.set_gate(gate);
    }
    let mut outcome = ReloadOutcome {
        unchanged: plan.unchanged,
        applied: plan.applied,
        needs_restart: plan.needs_restart,
        ..Default::default()
    };
    in_force.tokens = plan.tokens;
    let running = &mut in_force.config;
    let registry = &app.registry;
    let mut tasks = Vec::new();
    for (rt, change) in plan.built {
        match change {
            Change::Added => match registry
                .add_runtime(rt.id.clone(), &rt.kind, rt.source)
                .await
            {
                Ok(()) => outcome.added.push(rt.id),
                Err(e) => tracing::error!(runtime = %rt.id, error = %e, "adding a runtime failed"),
            },
            Change::Changed => {
                outcome.changed.push(rt.id.clone());
                let old_kind = running
                    .runtimes
                    .iter()
                    .find(|o| o.id == rt.id)
                    .map(|o| o.kind.clone());
                let config = new
                    .runtimes
                    .iter()
                    .find(|n| n.id == rt.id)
                    .map(|n| running.source_config(n));
                let registry = registry.clone();
                tasks.push(tokio::spawn(async move {
                    change_runtime(&registry, rt, old_kind, config).await
                }));
            }
            Change::Unchanged => {}
        }
    }
    for id in &plan.removed {
        let registry = registry.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = registry.remove_runtime(&id, None).await {
                tracing::error!(runtime = %id, error = %e, "removing a runtime failed");
            }
            None
        }));
    }
    for task in tasks {
        match task.await {
            Ok(Some(replaced)) => outcome.replaced.push(replaced),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "a runtime change panicked"),
        }
    }
    outcome.removed = plan.removed;
    // The order of the file, whatever order the changes finished in.
    outcome
        .replaced
        .sort_by_key(|id| outcome.changed.iter().position(|c| c == id));

    // What is in force now: the new runtimes and the keys that applied; the keys that take
    // a restart keep their running values, so they are reported again until then.
    running.runtimes = new.runtimes;
    running.server.tokens = new.server.tokens;
    running.server.allowed_hosts = new.server.allowed_hosts;
    running.server.allowed_origins = new.server.allowed_origins;
    outcome
}

/// Changes one runtime: in place where its source takes the new table, else by replacing
/// the source with `rt.source` (built from the new table). Returns the id when replaced.
async fn change_runtime(
    registry: &registry_core::Registry,
    rt: BuiltRuntime,
    old_kind: Option<String>,
    config: Option<SourceConfig>,
) -> Option<RuntimeId> {
    let same_kind = old_kind.as_deref() == Some(rt.kind.as_str());
    if let (true, Some(config)) = (same_kind, &config) {
        match registry.reconfigure_runtime(&rt.id, config).await {
            Ok(true) => {
                // The source built to check the table is not needed: it never ran a worker.
                rt.source.shutdown(Some(Duration::ZERO)).await;
                return None;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(runtime = %rt.id, error = %e, "the runtime could not take its new config in place; replacing it");
            }
        }
    }
    match registry
        .replace_runtime(&rt.id, &rt.kind, rt.source.clone(), None)
        .await
    {
        Ok(()) => Some(rt.id),
        Err(e) => {
            tracing::error!(runtime = %rt.id, error = %e, "replacing a runtime failed");
            rt.source.shutdown(Some(Duration::ZERO)).await;
            None
        }
    }
}
