//! Planning: a spawn request checked against the runtime's config and turned into what to
//! run (argv, environment, working directory, output retention, grace). Nothing here starts a
//! process or touches a worker record.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::Inner;
use crate::limits::{
    MAX_ARGV_BYTES, MAX_ARG_BYTES, MAX_GRACE, MAX_LABELS, MAX_SHORT_TEXT, MAX_STDIN_BYTES,
};
use crate::sys;
use crate::types::{RuntimeError, SpawnSpec};

/// PATH given to workers when the host has none, and to the watchdog.
pub(crate) const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// A validated spawn request, ready to run.
pub(super) struct Plan {
    pub(super) argv: Vec<String>,
    pub(super) env: Vec<(OsString, OsString)>,
    pub(super) cwd: Option<PathBuf>,
    pub(super) retention: u64,
    pub(super) grace: Duration,
}

impl Plan {
    pub(super) fn command(&self) -> Command {
        let mut command = Command::new(&self.argv[0]);
        command
            .args(&self.argv[1..])
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(cwd) = &self.cwd {
            command.current_dir(cwd);
        }
        sys::configure_worker(&mut command, sys::own_pid());
        command
    }
}

impl Inner {
    /// Validates a spawn request against the config and builds what to run.
    pub(super) fn plan(&self, spec: &SpawnSpec) -> Result<Plan, RuntimeError> {
        let invalid = |m: &str| RuntimeError::InvalidRequest(m.into());
        check_bounds(spec)?;
        let (mut argv, profile) = match (&spec.profile, &spec.command) {
            (Some(_), Some(_)) => {
                return Err(invalid("give either a profile or a command, not both"))
            }
            (None, None) => return Err(invalid("give a profile or a command")),
            (Some(name), None) => {
                let profile = self.config.profiles.get(name).ok_or_else(|| {
                    let known: Vec<&str> =
                        self.config.profiles.keys().map(String::as_str).collect();
                    invalid(&format!(
                        "unknown profile {:?}; this runtime has: {}",
                        name.chars().take(64).collect::<String>(),
                        if known.is_empty() {
                            "no profiles".to_string()
                        } else {
                            known.join(", ")
                        }
                    ))
                })?;
                (profile.command.clone(), Some(profile))
            }
            (None, Some(command)) => {
                if !self.config.allow_commands {
                    return Err(RuntimeError::Forbidden(
                        "this runtime only runs profiles, not commands".into(),
                    ));
                }
                (command.clone(), None)
            }
        };
        argv.extend(spec.args.iter().cloned());
        if !matches!(argv.first(), Some(p) if !p.is_empty()) {
            return Err(invalid("the command is empty"));
        }
        if argv.iter().any(|a| a.contains('\0')) {
            return Err(invalid("arguments must not contain NUL bytes"));
        }
        let mut env: BTreeMap<OsString, OsString> = BTreeMap::new();
        env.insert(
            "PATH".into(),
            std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
        );
        for key in ["HOME", "LANG"] {
            if let Some(value) = std::env::var_os(key) {
                env.insert(key.into(), value);
            }
        }
        let extra = profile
            .map(|p| &p.env)
            .into_iter()
            .flatten()
            .chain(spec.env.iter());
        for (key, value) in extra {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(invalid(
                    "environment names must be non-empty, without '=' or NUL",
                ));
            }
            if value.contains('\0') {
                return Err(invalid("environment values must not contain NUL bytes"));
            }
            env.insert(key.into(), value.into());
        }
        Ok(Plan {
            argv,
            env: env.into_iter().collect(),
            cwd: profile.and_then(|p| p.cwd.clone()),
            retention: profile
                .and_then(|p| p.output_retention)
                .unwrap_or(self.config.output_retention),
            grace: profile
                .and_then(|p| p.grace)
                .unwrap_or(self.config.default_grace)
                .min(MAX_GRACE),
        })
    }
}

/// Refuses a request beyond the [`limits`](crate::limits), naming the field.
fn check_bounds(spec: &SpawnSpec) -> Result<(), RuntimeError> {
    let invalid = |m: String| Err(RuntimeError::InvalidRequest(m));
    let command = spec.command.as_deref().unwrap_or_default();
    for (field, list) in [("command", command), ("args", &spec.args[..])] {
        if list.iter().any(|a| a.len() > MAX_ARG_BYTES) {
            return invalid(format!(
                "an entry of `{field}` is longer than {MAX_ARG_BYTES} bytes"
            ));
        }
    }
    let argv_bytes = command
        .iter()
        .chain(&spec.args)
        .chain(spec.env.iter().flat_map(|(k, v)| [k, v]))
        .fold(0usize, |sum, s| sum.saturating_add(s.len()));
    if argv_bytes > MAX_ARGV_BYTES {
        return invalid(format!(
            "`command`, `args` and `env` together are longer than {MAX_ARGV_BYTES} bytes"
        ));
    }
    if spec
        .stdin
        .as_ref()
        .is_some_and(|s| s.len() > MAX_STDIN_BYTES)
    {
        return invalid(format!("`stdin` is longer than {MAX_STDIN_BYTES} bytes"));
    }
    for (field, text) in [("name", &spec.name), ("request_id", &spec.request_id)] {
        if text.as_ref().is_some_and(|t| t.len() > MAX_SHORT_TEXT) {
            return invalid(format!("`{field}` is longer than {MAX_SHORT_TEXT} bytes"));
        }
    }
    if spec.labels.len() > MAX_LABELS {
        return invalid(format!("`labels` holds more than {MAX_LABELS} entries"));
    }
    for (key, value) in &spec.labels {
        if key.len() > MAX_SHORT_TEXT || value.len() > MAX_SHORT_TEXT {
            return invalid(format!(
                "a key or value of `labels` is longer than {MAX_SHORT_TEXT} bytes"
            ));
        }
    }
    Ok(())
}
