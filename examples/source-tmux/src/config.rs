//! The `tmux` runtime's table in the config file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use registry_core::{de, Redacted, RedactedValues};
use serde::Deserialize;

/// Longest `socket_name`.
pub const MAX_SOCKET_NAME: usize = 64;

/// Longest grace period between SIGTERM and SIGKILL (the core's): a longer one (from a stop,
/// a profile or the config) is cut to this.
pub use registry_core::limits::MAX_GRACE;

/// Settings of a `tmux` runtime: the keys of its `[[runtimes]]` table besides `name` and
/// `source`. Every key is optional; an unknown key is an error that names it.
///
/// The names and meanings of `profiles`, `allow_commands`, `max_workers`, `max_finished`,
/// `output_retention`, `grace` and `retain_finished` are those of the `embedded` kind, so a
/// runtime can be moved between the two kinds and keep that part of its table.
///
/// ```toml
/// [[runtimes]]
/// name = "term"
/// source = "tmux"
/// socket_name = "roster-term"  # the tmux server (`tmux -L`); default "roster-<name>"
/// allow_commands = false       # may a spawn give an argv instead of a profile?
/// max_workers = 64             # live workers (sessions) at once
/// max_finished = 1024          # finished records kept; the oldest go first
/// output_retention = "1MiB"    # output kept per worker
/// grace = "10s"                # SIGTERM → SIGKILL, unless the stop or the profile says
/// retain_finished = "1h"       # how long a finished record is kept
/// tmux = "tmux"                # the tmux program (looked up on PATH)
/// [runtimes.profiles.shell]
/// command = ["/bin/sh", "-c"]
/// ```
///
/// `Debug` shows neither paths nor environment values.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TmuxConfig {
    /// The name of the tmux server this runtime owns (`tmux -L NAME`): letters, digits, `_`
    /// and `-`, at most [`MAX_SOCKET_NAME`] characters. Default (the factory's):
    /// `roster-<runtime name>`, cut to [`MAX_SOCKET_NAME`].
    pub socket_name: Option<Redacted<String>>,
    /// Spawn templates by name.
    pub profiles: BTreeMap<String, Profile>,
    /// Whether a spawn may give a `command` in place of a profile. Default `false`.
    pub allow_commands: bool,
    /// Live (non-terminal) workers allowed at once. Default 64.
    pub max_workers: usize,
    /// Finished worker records kept; beyond it the oldest is removed. Default 1024.
    pub max_finished: usize,
    /// Output bytes kept per worker (at least this many of the newest). Default 1 MiB.
    #[serde(deserialize_with = "de::byte_size")]
    pub output_retention: u64,
    /// Time between SIGTERM and SIGKILL when stopping, unless the stop request or the
    /// profile gives one. Default 10 s; at most [`MAX_GRACE`].
    #[serde(deserialize_with = "de::duration")]
    pub grace: Duration,
    /// How long a finished worker record is kept. Default 1 h.
    #[serde(deserialize_with = "de::duration")]
    pub retain_finished: Duration,
    /// The tmux program: a path, or a name looked up on `PATH`. Default `tmux`. Version 3.3
    /// or newer.
    pub tmux: Redacted<PathBuf>,
}

impl Default for TmuxConfig {
    fn default() -> Self {
        TmuxConfig {
            socket_name: None,
            profiles: BTreeMap::new(),
            allow_commands: false,
            max_workers: 64,
            max_finished: 1024,
            output_retention: 1 << 20,
            grace: Duration::from_secs(10),
            retain_finished: Duration::from_secs(3600),
            tmux: PathBuf::from("tmux").into(),
        }
    }
}

/// A spawn template: what to run and how. The worker's argv is `command` followed by the
/// spawn request's `args`; its environment gets `env`, then the request's `env`.
///
/// The keys are those of the `embedded` kind's profiles:
///
/// ```toml
/// command = ["/bin/sh", "-c"]
/// cwd = "/srv/jobs"
/// env = { RUST_LOG = "info" }
/// output_retention = "64KiB"
/// grace = "5s"
/// ```
///
/// `Debug` shows the env keys but never their values, and never the `cwd` path.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The argv prefix, e.g. `["/bin/sh", "-c"]`. Must not be empty.
    pub command: Vec<String>,
    /// Working directory of the worker; the server process's own when unset. A relative
    /// path is taken from the server process's working directory.
    #[serde(default)]
    pub cwd: Option<Redacted<PathBuf>>,
    /// Environment added to the worker's. Names are letters, digits and `_`, not starting
    /// with a digit (the worker's shell wrapper exports them).
    #[serde(default)]
    pub env: RedactedValues<BTreeMap<String, String>>,
    /// Output bytes kept per worker; overrides the runtime's `output_retention`.
    #[serde(default, deserialize_with = "de::opt_byte_size")]
    pub output_retention: Option<u64>,
    /// Time between SIGTERM and SIGKILL; overrides the runtime's `grace`.
    #[serde(default, deserialize_with = "de::opt_duration")]
    pub grace: Option<Duration>,
}

impl TmuxConfig {
    /// The default `socket_name` of the runtime named `runtime`: `roster-<runtime>`, cut to
    /// [`MAX_SOCKET_NAME`] characters.
    pub fn default_socket_name(runtime: &str) -> String {
        let mut name = format!("roster-{runtime}");
        name.truncate(MAX_SOCKET_NAME);
        name
    }

    /// Checks what serde cannot: the shapes of `socket_name`, the profiles, the limits.
    /// The message names the key at fault.
    pub(crate) fn check(&self) -> Result<(), String> {
        self.problem().map_err(|(_, message)| message)
    }

    /// [`check`](Self::check), with the key path at fault (`profiles.shell.command`) beside
    /// the message.
    pub(crate) fn problem(&self) -> Result<(), (String, String)> {
        let top = |key: &str, message: String| (key.to_string(), message);
        if let Some(name) = &self.socket_name {
            check_socket_name(name).map_err(|m| top("socket_name", m))?;
        }
        if self.max_workers == 0 {
            return Err(top(
                "max_workers",
                "`max_workers` must be at least 1".into(),
            ));
        }
        if self.tmux.as_os_str().is_empty() {
            return Err(top(
                "tmux",
                "`tmux` is empty; give the tmux program, e.g. \"tmux\"".into(),
            ));
        }
        for (name, profile) in &self.profiles {
            let path = |key: &str| format!("profiles.{name}.{key}");
            let at = |key: &str| format!("`{}`", path(key));
            let fail = |key: &str, message: String| Err((path(key), message));
            match profile.command.first() {
                None => {
                    return fail(
                        "command",
                        format!("{} must hold at least the program", at("command")),
                    )
                }
                Some(p) if p.is_empty() => {
                    return fail(
                        "command",
                        format!("{}: the program is empty", at("command")),
                    )
                }
                Some(_) => {}
            }
            if profile.command.iter().any(|a| a.contains('\0')) {
                return fail(
                    "command",
                    format!("{} holds a NUL character", at("command")),
                );
            }
            for (key, value) in &profile.env {
                if !is_env_name(key) {
                    return fail(
                        "env",
                        format!(
                            "{}: {key:?} is not an environment name a tmux worker can get \
                             (letters, digits and '_', not starting with a digit)",
                            at("env")
                        ),
                    );
                }
                if value.contains('\0') {
                    return fail(
                        "env",
                        format!("{}: the value of {key} holds a NUL character", at("env")),
                    );
                }
            }
            if let Some(cwd) = &profile.cwd {
                if cwd.as_os_str().is_empty() {
                    return fail("cwd", format!("{} is empty", at("cwd")));
                }
            }
        }
        Ok(())
    }
}

/// Checks a `socket_name`: letters, digits, `_` and `-`, 1 to [`MAX_SOCKET_NAME`] characters.
fn check_socket_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_SOCKET_NAME {
        return Err(format!(
            "`socket_name` must be 1 to {MAX_SOCKET_NAME} characters long"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err("`socket_name` may hold only letters, digits, '_' and '-'".into());
    }
    Ok(())
}

/// Whether `name` is an environment name the worker's shell wrapper can export.
pub(crate) fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TmuxConfig, String> {
        let config: TmuxConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.check()?;
        Ok(config)
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let c = TmuxConfig::default();
        assert_eq!(c.max_workers, 64);
        assert_eq!(c.max_finished, 1024);
        assert_eq!(c.output_retention, 1 << 20);
        assert_eq!(c.grace, Duration::from_secs(10));
        assert_eq!(c.retain_finished, Duration::from_secs(3600));
        assert_eq!(c.tmux, PathBuf::from("tmux"));
        assert!(!c.allow_commands && c.profiles.is_empty() && c.socket_name.is_none());
        assert_eq!(parse("").unwrap(), c);
    }

    #[test]
    fn an_embedded_profile_table_reads_as_a_tmux_one() {
        let c = parse(
            r#"
            allow_commands = true
            max_workers = 3
            output_retention = "64KiB"
            grace = "1500ms"
            retain_finished = "5m"
            [profiles.shell]
            command = ["/bin/sh", "-c"]
            cwd = "/tmp"
            env = { RUST_LOG = "info" }
            output_retention = 4096
            grace = "2s"
            "#,
        )
        .unwrap();
        let shell = &c.profiles["shell"];
        assert_eq!(shell.command, ["/bin/sh", "-c"]);
        assert_eq!(shell.output_retention, Some(4096));
        assert_eq!(shell.grace, Some(Duration::from_secs(2)));
        assert_eq!(c.output_retention, 64 << 10);
        assert_eq!(c.grace, Duration::from_millis(1500));
        assert!(c.allow_commands);
    }

    #[test]
    fn errors_name_the_key() {
        for (text, key) in [
            ("socket_name = \"a/b\"", "`socket_name`"),
            ("socket_name = \"\"", "`socket_name`"),
            (
                &format!("socket_name = \"{}\"", "a".repeat(65)),
                "`socket_name`",
            ),
            ("max_workers = 0", "`max_workers`"),
            ("[profiles.x]\ncommand = []", "`profiles.x.command`"),
            ("[profiles.x]\ncommand = [\"\"]", "`profiles.x.command`"),
            (
                "[profiles.x]\ncommand = [\"sh\"]\nenv = { \"A-B\" = \"1\" }",
                "`profiles.x.env`",
            ),
            ("tmux = \"\"", "`tmux`"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(key), "{text}: {err}");
        }
        let err = parse("socket_nam = \"x\"").unwrap_err();
        assert!(err.contains("socket_nam"), "{err}");
        let err = parse("[profiles.x]\ncommand = [\"sh\"]\nshell = 1").unwrap_err();
        assert!(err.contains("shell"), "{err}");
    }

    #[test]
    fn the_default_socket_name_is_valid_for_every_runtime_name() {
        assert_eq!(TmuxConfig::default_socket_name("term"), "roster-term");
        let long = TmuxConfig::default_socket_name(&format!("a{}", "b".repeat(62)));
        assert_eq!(long.len(), MAX_SOCKET_NAME);
        assert!(check_socket_name(&long).is_ok());
    }

    #[test]
    fn debug_shows_no_paths_nor_environment_values() {
        let c = parse(
            r#"
            socket_name = "private-sock"
            tmux = "/opt/secret/bin/tmux"
            [profiles.x]
            command = ["sh"]
            cwd = "/srv/hidden"
            env = { TOKEN = "s3cr3t" }
            "#,
        )
        .unwrap();
        let text = format!("{c:?}");
        for secret in ["/opt/secret", "/srv/hidden", "s3cr3t", "private-sock"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains("TOKEN"), "{text}");
    }

    #[test]
    fn env_names_are_shell_identifiers() {
        assert!(is_env_name("PATH") && is_env_name("_x1") && is_env_name("a"));
        assert!(!is_env_name("") && !is_env_name("1A") && !is_env_name("A-B"));
        assert!(!is_env_name("A=B") && !is_env_name("é"));
    }
}
