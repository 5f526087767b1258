//! Planning: a spawn request checked against the runtime's config and turned into what to
//! run (argv, environment, working directory, output retention, grace). Nothing here starts a
//! process or touches a worker record.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use registry_core::RegistryError;

use super::Inner;
use crate::config::{check_restarts_unhealthy, Profile};
use crate::limits::MAX_GRACE;
use crate::probe::{OnUnhealthy, ProbePlan};
use crate::restart::RestartPolicy;
use crate::sys::Exec;
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
    pub(super) restart: RestartPolicy,
    /// The profile's health probe, if it has one.
    pub(super) probe: Option<ProbePlan>,
}

impl Plan {
    /// What the spawner thread runs: the argv with exactly the plan's environment, stdin,
    /// stdout and stderr piped, in the working directory if there is one. An error here (a
    /// NUL byte in the working directory) is a spawn failure like a missing program.
    pub(super) fn exec(&self) -> std::io::Result<Exec> {
        Exec::new(&self.argv, &self.env, self.cwd.as_deref(), DEFAULT_PATH)
    }

    /// Why this plan's process could not be started, for the worker's view: what went wrong
    /// in words, then the system's error ("program not found: No such file or directory (os
    /// error 2)"). It names neither the program nor the working directory: either may be a
    /// host path from a profile, and the request's own program is in the view already.
    pub(super) fn failure_message(&self, error: &io::Error) -> String {
        // The kernel says ENOENT both for a missing program and a missing working directory.
        let cwd_missing = self.cwd.as_ref().is_some_and(|dir| !dir.is_dir());
        let what = match error.raw_os_error() {
            Some(libc::ENOENT) if cwd_missing => "working directory not found",
            Some(libc::ENOENT) => "program not found",
            Some(libc::EACCES) if cwd_missing => "working directory not usable",
            Some(libc::EACCES) => {
                "permission denied (the program is not executable, or a directory on the way \
                 to it or the working directory is not searchable)"
            }
            Some(libc::ENOEXEC) => "not an executable program (no #! line, or a foreign binary)",
            Some(libc::ENOTDIR) => {
                "a part of the program's or working directory's path is not a directory"
            }
            Some(libc::E2BIG) => "the arguments and environment are too large for the system",
            Some(libc::ETXTBSY) => "the program's file is being written to",
            _ => "the program could not be started",
        };
        format!("{what}: {error}")
    }
}

impl Inner {
    /// Validates a spawn request against the config and builds what to run.
    pub(super) fn plan(&self, spec: &SpawnSpec) -> Result<Plan, RuntimeError> {
        let invalid = |m: &str| RuntimeError::InvalidRequest(m.into());
        // The request's shape and bounds are the core's rule; what is left here is what only
        // this runtime's config can say (profiles, commands allowed) and the profile's env.
        spec.validate().map_err(|e| match e {
            RegistryError::InvalidRequest(message) => RuntimeError::InvalidRequest(message),
            other => RuntimeError::InvalidRequest(other.public_message()),
        })?;
        let profiles = self.profiles();
        let (mut argv, profile) = match (&spec.profile, &spec.command) {
            // `validate` refused both and neither.
            (Some(_), Some(_)) | (None, None) => {
                return Err(invalid("give either a profile or a command"))
            }
            (Some(name), None) => {
                let profile = profiles.get(name).ok_or_else(|| {
                    let known: Vec<&str> = profiles.keys().map(String::as_str).collect();
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
        let restart = profile
            .map(Profile::restart_policy)
            .unwrap_or_default()
            .with_request(spec);
        // Checked when the runtime was made; an error here would be a profile changed since.
        let probe = match profile.map(Profile::probe_plan).transpose() {
            Ok(probe) => probe.flatten(),
            Err(e) => return Err(RuntimeError::InvalidRequest(e)),
        };
        if probe
            .as_ref()
            .is_some_and(|p| p.on_unhealthy == OnUnhealthy::Restart)
        {
            check_restarts_unhealthy(restart.restart).map_err(|e| {
                RuntimeError::InvalidRequest(format!(
                    "this profile restarts unhealthy workers: {e}"
                ))
            })?;
        }
        Ok(Plan {
            argv,
            env: env.into_iter().collect(),
            cwd: profile.and_then(|p| p.cwd.as_ref().map(|c| c.0.clone())),
            retention: profile
                .and_then(|p| p.output_retention)
                .unwrap_or(self.config.output_retention),
            grace: profile
                .and_then(|p| p.grace)
                .unwrap_or(self.config.grace)
                .min(MAX_GRACE),
            restart,
            probe,
        })
    }
}
