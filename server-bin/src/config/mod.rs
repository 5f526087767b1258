//! The `roster` config file (TOML).
//!
//! ```toml
//! [server]
//! listen = "127.0.0.1:7411"           # default 127.0.0.1:7411
//! state_dir = "/var/lib/roster"       # default ./.roster
//! allowed_hosts = ["roster.internal"] # Host names accepted besides the loopback names
//! allowed_origins = ["https://console.example"] # origins accepted besides same-origin
//! max_body = "1MiB"                   # request body cap (bytes, or "512KiB", …)
//! shutdown_grace = "10s"
//! sse_ping = "15s"
//! event_retention = 10000
//! event_retention_bytes = "64MiB"
//! subscriber_queue = 1024
//! [[server.tokens]]
//! name = "console"
//! scope = "operate"                   # "read" or "operate"
//! token_env = "ROSTER_CONSOLE_TOKEN"  # or token_file = "/etc/roster/console.token"
//!
//! [[runtimes]]
//! name = "local"                      # the runtime's id
//! source = "embedded"                 # the kind; every other key belongs to the source
//! max_workers = 256
//! [runtimes.profiles.shell]
//! command = ["/bin/sh", "-c"]
//! ```
//!
//! Every error names the key at fault and, where the text shows it, the 1-based line.
//! [`Config::check_file`] reports every error of a file, in file order; [`Config::parse`]
//! and [`Config::load`] the first. The
//! keys of `[server]`, `[[server.tokens]]` and the top level are checked by [`Config::parse`];
//! the keys of a runtime besides `name` and `source` belong to its source and are checked by
//! the source's factory in [`Config::build_sources`], which reports the line of the key the
//! factory names.
//!
//! Nothing here prints a token's secret, a token file's path, the state directory or the
//! values of a runtime's table in `Debug` output.
//!
//! One job a file: [`server`](ServerSection) (the `[server]` table), tokens
//! ([`TokenSection`], [`LoadedToken`]), runtimes ([`RuntimeSection`], building the sources)
//! and `lines` (the key index and [`ConfigFileError`]).

mod check;
mod lines;
mod runtimes;
mod server;
#[cfg(test)]
mod tests;
mod tokens;

use std::fs;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

pub use crate::auth::{is_loopback, AllowedHost, AllowedOrigin, Scope};
pub use check::CheckReport;
pub use lines::{ConfigErrors, ConfigFileError};
pub use runtimes::{BuiltRuntime, RuntimeSection};
pub use server::{ServerSection, DEFAULT_LISTEN};
pub use tokens::{LoadedToken, TokenSection};

use runtimes::default_runtime;

/// The whole config: the server's settings and the runtimes it serves.
#[derive(Clone, Debug)]
pub struct Config {
    /// The `[server]` table.
    pub server: ServerSection,
    /// The `[[runtimes]]` tables, in file order.
    pub runtimes: Vec<RuntimeSection>,
}

/// The file as serde reads it, before the runtimes are checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    #[serde(default)]
    pub(super) server: ServerSection,
    #[serde(default)]
    pub(super) runtimes: Vec<Spanned<toml::Table>>,
}

impl Config {
    /// The config of SPEC §8 without a file: the server defaults (listen on
    /// [`DEFAULT_LISTEN`], state in `./.roster`, no tokens) and one `embedded` runtime
    /// `local` with `allow_commands = true` and a profile `shell` = `["/bin/sh", "-c"]`.
    pub fn default_embedded() -> Config {
        Config {
            server: ServerSection::default(),
            runtimes: vec![default_runtime()],
        }
    }

    /// Parses the text of a config file.
    ///
    /// A file without any `[[runtimes]]` (an empty file too, or `runtimes = []`) gets the
    /// default runtime of [`Config::default_embedded`]: one `embedded` runtime `local` with
    /// a `shell` profile and `allow_commands = true`.
    ///
    /// Checked here: the TOML syntax; every key and value of `[server]`,
    /// `[[server.tokens]]` and the top level (an unknown key is an error); each token has
    /// a non-empty unique `name` and exactly one of `token_env` / `token_file`;
    /// `state_dir` is not empty; the numbers `max_body`, `event_retention`,
    /// `event_retention_bytes` and `subscriber_queue` are not zero, `sse_ping` is at least
    /// 1ms, `sse_ping` and `shutdown_grace` are at most 1h and `subscriber_queue` at most
    /// 1 048 576; each allowed host is a bare host name without a port (kept lower-cased,
    /// without trailing dots and an IPv6 address without brackets, as the server compares
    /// it) and each allowed origin is `scheme://host[:port]` without a default or empty
    /// port; each runtime has a valid unique `name` and a `source`. The other keys of a
    /// runtime are checked by its source in [`Config::build_sources`].
    ///
    /// The error is the first of the file; [`Config::check_file`] reports every one.
    pub fn parse(text: &str) -> Result<Config, ConfigFileError> {
        let (config, errors) = check::parse_every(text);
        match ConfigErrors::in_file_order(errors).into_first() {
            Some(first) => Err(first),
            None => Ok(config.expect("a config without errors was read")),
        }
    }

    /// Reads and parses the file at `path`. A file that can't be read is an error naming
    /// the file; errors in its text are as [`Config::parse`] gives them.
    pub fn load(path: &Path) -> Result<Config, ConfigFileError> {
        let text = fs::read_to_string(path).map_err(|e| {
            ConfigFileError::new(
                None,
                format!("cannot read the config file {}: {e}", path.display()),
            )
        })?;
        Config::parse(&text)
    }
}
