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
//! Every error names the key at fault and, where the text shows it, the 1-based line. The
//! keys of `[server]`, `[[server.tokens]]` and the top level are checked by [`Config::parse`];
//! the keys of a runtime besides `name` and `source` belong to its source and are checked by
//! the source's factory in [`Config::build_sources`], which reports the line of the key the
//! factory names.
//!
//! Nothing here prints a token's secret, a token file's path, the state directory or the
//! values of a runtime's table in `Debug` output.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use registry_core::{
    de, ConfigError, RuntimeId, RuntimeSource, SourceConfig, SourceFactories, MAX_SUBSCRIBER_QUEUE,
};
use serde::{Deserialize, Serialize};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// The listen address when neither the file nor a flag gives one.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7411";
/// The state directory when neither the file nor a flag gives one.
const DEFAULT_STATE_DIR: &str = "./.roster";
/// Default request body cap: 1 MiB.
const DEFAULT_MAX_BODY: u64 = 1 << 20;
/// Default time in-flight work gets on shutdown.
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Default interval between keep-alive comments on event streams.
const DEFAULT_SSE_PING: Duration = Duration::from_secs(15);
/// Default number of registry events kept for resuming streams.
const DEFAULT_EVENT_RETENTION: usize = 10_000;
/// Default approximate bytes of registry events kept: 64 MiB.
const DEFAULT_EVENT_RETENTION_BYTES: u64 = 64 << 20;
/// Default queue length of one stream subscriber.
const DEFAULT_SUBSCRIBER_QUEUE: usize = 1024;
/// The shortest token secret accepted, in bytes.
const MIN_SECRET_LEN: usize = 16;
/// The name of the runtime a file without `[[runtimes]]` gets.
const DEFAULT_RUNTIME: &str = "local";

/// The whole config: the server's settings and the runtimes it serves.
#[derive(Clone, Debug)]
pub struct Config {
    /// The `[server]` table.
    pub server: ServerSection,
    /// The `[[runtimes]]` tables, in file order.
    pub runtimes: Vec<RuntimeSection>,
}

/// The `[server]` table. Every key is optional; an unknown key is an error.
///
/// `Debug` does not print `state_dir`.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// The address to listen on. Default [`DEFAULT_LISTEN`]. Without tokens it must be a
    /// loopback address (see [`Config::check_listen`]).
    pub listen: SocketAddr,
    /// Where the server keeps its state (the worker id key, each runtime's directory).
    /// Default `./.roster`.
    pub state_dir: PathBuf,
    /// The bearer tokens, `[[server.tokens]]`. None by default.
    pub tokens: Vec<TokenSection>,
    /// `Host` names accepted besides the loopback names, compared without the port. Read
    /// lower-cased, without trailing dots, an IPv6 address without its brackets. Empty by
    /// default.
    pub allowed_hosts: Vec<String>,
    /// Origins (`scheme://host[:port]`) accepted on requests with a body besides the
    /// server's own. Compared exactly. Empty by default.
    pub allowed_origins: Vec<String>,
    /// Request body cap in bytes; written as an integer or as `"1MiB"`, `"512KiB"`, ….
    /// Default 1 MiB.
    #[serde(deserialize_with = "de::byte_size")]
    pub max_body: u64,
    /// How long shutdown waits for workers and streams (humantime, e.g. `"10s"`).
    /// Default 10 s.
    #[serde(deserialize_with = "de::duration")]
    pub shutdown_grace: Duration,
    /// Interval between keep-alive comments on event streams. Default 15 s.
    #[serde(deserialize_with = "de::duration")]
    pub sse_ping: Duration,
    /// Registry events kept for resuming streams. Default 10 000.
    pub event_retention: usize,
    /// Approximate bytes of registry events kept (integer or `"64MiB"`). Default 64 MiB.
    #[serde(deserialize_with = "de::byte_size")]
    pub event_retention_bytes: u64,
    /// Events that may wait for one stream subscriber. Default 1024.
    pub subscriber_queue: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 7411)),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            tokens: Vec::new(),
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            max_body: DEFAULT_MAX_BODY,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            sse_ping: DEFAULT_SSE_PING,
            event_retention: DEFAULT_EVENT_RETENTION,
            event_retention_bytes: DEFAULT_EVENT_RETENTION_BYTES,
            subscriber_queue: DEFAULT_SUBSCRIBER_QUEUE,
        }
    }
}

impl fmt::Debug for ServerSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerSection")
            .field("listen", &self.listen)
            .field("state_dir", &Redacted)
            .field("tokens", &self.tokens)
            .field("allowed_hosts", &self.allowed_hosts)
            .field("allowed_origins", &self.allowed_origins)
            .field("max_body", &self.max_body)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("sse_ping", &self.sse_ping)
            .field("event_retention", &self.event_retention)
            .field("event_retention_bytes", &self.event_retention_bytes)
            .field("subscriber_queue", &self.subscriber_queue)
            .finish()
    }
}

/// One `[[server.tokens]]` entry: where a bearer token's secret comes from, never the secret.
///
/// Exactly one of `token_env` and `token_file` is set. `Debug` does not print the file path.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSection {
    /// A name for the token, unique in the file; errors and logs use it.
    pub name: String,
    /// What the token may do.
    pub scope: Scope,
    /// The environment variable that holds the secret.
    #[serde(default)]
    pub token_env: Option<String>,
    /// A file that holds the secret (trailing whitespace is ignored).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

impl fmt::Debug for TokenSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSection")
            .field("name", &self.name)
            .field("scope", &self.scope)
            .field("token_env", &self.token_env)
            .field("token_file", &self.token_file.as_ref().map(|_| Redacted))
            .finish()
    }
}

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// GET requests and event streams.
    Read,
    /// Everything `read` may, plus spawn, input, stop and delete.
    Operate,
}

impl Scope {
    /// Whether a token of this scope may do what needs `needed`: `operate` allows both
    /// scopes, `read` allows only `read`.
    pub fn allows(self, needed: Scope) -> bool {
        match self {
            Scope::Operate => true,
            Scope::Read => needed == Scope::Read,
        }
    }
}

/// One `[[runtimes]]` entry.
///
/// `Debug` shows the id, the kind and the key names of the table, never its values (they
/// may be URLs or paths).
#[derive(Clone)]
pub struct RuntimeSection {
    /// The runtime's id (its `name`).
    pub id: RuntimeId,
    /// The source kind (its `source`), e.g. `"embedded"`.
    pub kind: String,
    /// The table without `name` and `source`: the source's own settings.
    pub table: toml::Table,
    /// The 1-based line of the runtime's `[[runtimes]]` header (or of its inline table);
    /// 0 for a runtime that is not written in a file.
    pub line: usize,
    /// The line of the `source` key; 0 when unknown.
    source_line: usize,
    /// Every key of `table` at any depth, in file order; empty when not from a file.
    keys: Vec<KeyLine>,
}

/// A key of a runtime's table and the line it is on.
#[derive(Clone)]
struct KeyLine {
    /// The dotted path from the runtime's table, e.g. `profiles.shell.command`.
    path: String,
    /// The last part of the path, e.g. `command`.
    leaf: String,
    /// The 1-based line.
    line: usize,
}

impl RuntimeSection {
    /// A runtime that is not written in a file (its `line` is 0): `table` holds the source's
    /// settings, without `name` and `source`.
    pub fn new(id: RuntimeId, kind: impl Into<String>, table: toml::Table) -> RuntimeSection {
        RuntimeSection {
            id,
            kind: kind.into(),
            table,
            line: 0,
            source_line: 0,
            keys: Vec::new(),
        }
    }

    /// The config error `err` of this runtime's factory as a file error (or, for an unknown
    /// kind, at the line of `source`).
    ///
    /// A message that ends with the table it is about (``… in `profiles.shell` ``, as toml
    /// writes it) is placed by that table: at the line of a key of that table the message
    /// names, else at the table's own line (its header), else at the runtime's line. A
    /// message without one is placed at the key it names: a key path of the runtime's
    /// table, else a key of the runtime's table itself, else a key of that name at any
    /// depth (and the message then says which table), else at the runtime's line.
    fn factory_error(&self, err: &ConfigError, kind_known: bool) -> ConfigFileError {
        let message = err.message.trim();
        let runtime = format!("runtime \"{}\"", self.id);
        if !kind_known {
            return ConfigFileError::new(
                known_line(self.source_line).or(known_line(self.line)),
                format!("{runtime}: {message}"),
            );
        }
        let plain = || ConfigFileError::new(known_line(self.line), format!("{runtime}: {message}"));
        let line_of_path = |path: &str| self.keys.iter().find(|k| k.path == path).map(|k| k.line);

        if let Some((head, context)) = split_context(message) {
            let line = backticked(head)
                .find_map(|name| line_of_path(&format!("{context}.{name}")))
                .or_else(|| line_of_path(context));
            return match line {
                Some(line) => ConfigFileError::new(Some(line), format!("{runtime}: {message}")),
                None => plain(),
            };
        }

        for quoted in backticked(message) {
            if let Some(line) = line_of_path(quoted) {
                return ConfigFileError::new(Some(line), format!("{runtime}: {message}"));
            }
            if let Some(key) = self.keys.iter().find(|k| k.leaf == quoted) {
                let message = match parent(&key.path) {
                    Some(parent) => format!("{runtime}: in `{parent}`: {message}"),
                    None => format!("{runtime}: {message}"),
                };
                return ConfigFileError::new(Some(key.line), message);
            }
        }
        plain()
    }
}

impl fmt::Debug for RuntimeSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeSection")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("keys", &self.table.keys().collect::<Vec<_>>())
            .field("line", &self.line)
            .finish_non_exhaustive()
    }
}

/// A token with its secret read. Not `Serialize`; `Debug` does not print the secret.
#[derive(Clone)]
pub struct LoadedToken {
    /// The token's name from the config.
    pub name: String,
    /// What the token may do.
    pub scope: Scope,
    /// The secret a client sends as `Authorization: Bearer <secret>`.
    pub secret: String,
}

impl fmt::Debug for LoadedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedToken")
            .field("name", &self.name)
            .field("scope", &self.scope)
            .field("secret", &Redacted)
            .finish()
    }
}

/// A runtime with its source built.
#[derive(Debug)]
pub struct BuiltRuntime {
    /// The runtime's id.
    pub id: RuntimeId,
    /// The source kind.
    pub kind: String,
    /// The source, started.
    pub source: Arc<dyn RuntimeSource>,
}

/// An error in the config, for the operator: it names the key at fault and, when known,
/// the 1-based line. It never holds a token's secret.
///
/// Displays as `line N: message`, or `message` when the line is unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", LinePrefix(*line))]
pub struct ConfigFileError {
    /// The 1-based line in the file, when the error has one.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl ConfigFileError {
    fn new(line: Option<usize>, message: impl Into<String>) -> Self {
        ConfigFileError {
            line,
            message: message.into(),
        }
    }
}

/// Displays `line N: ` for a known line, nothing otherwise.
struct LinePrefix(Option<usize>);

impl fmt::Display for LinePrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(line) => write!(f, "line {line}: "),
            None => Ok(()),
        }
    }
}

/// Prints `<redacted>` in place of a value.
struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The file as serde reads it, before the runtimes are checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    server: ServerSection,
    #[serde(default)]
    runtimes: Vec<Spanned<toml::Table>>,
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
    pub fn parse(text: &str) -> Result<Config, ConfigFileError> {
        let doc = DeTable::parse(text).map_err(|e| syntax_error(text, &e))?;
        let mut index = Vec::new();
        index_table(doc.get_ref(), "", &mut index);

        let mut raw = RawFile::deserialize(toml::Deserializer::from(doc.clone()))
            .map_err(|e| value_error(text, &index, &e))?;
        check_server(&mut raw.server, text, &index)?;

        let runtimes = if raw.runtimes.is_empty() {
            vec![default_runtime()]
        } else {
            let elements: Vec<&DeTable<'_>> = match doc.get_ref().get("runtimes") {
                Some(value) => match value.get_ref() {
                    DeValue::Array(array) => array
                        .iter()
                        .filter_map(|element| element.get_ref().as_table())
                        .collect(),
                    _ => Vec::new(),
                },
                None => Vec::new(),
            };
            parse_runtimes(text, raw.runtimes, &elements)?
        };

        Ok(Config {
            server: raw.server,
            runtimes,
        })
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

    /// Builds and starts every runtime's source, in file order, with
    /// `factories.build(kind, config)`, where the config holds the runtime's id, its table
    /// (without `name` and `source`) and `<state_dir>/runtimes/<id>` as its state
    /// directory.
    ///
    /// A factory's error becomes an error naming the runtime. A message that ends with the
    /// table it is about (``… in `profiles.shell` ``) is placed at the line of the key of
    /// that table it names, else at the table's line; any other at the line of the key it
    /// names (at any depth of the runtime's table); else at the runtime's line. An
    /// unknown kind is reported at the line of `source` with the known kinds. On an error
    /// the sources built so far are dropped without a shutdown: call this before anything
    /// depends on them. Call it inside a Tokio runtime: a source such as `embedded` starts
    /// tasks when it is built.
    pub fn build_sources(
        &self,
        factories: &SourceFactories,
    ) -> Result<Vec<BuiltRuntime>, ConfigFileError> {
        let kinds = factories.kinds();
        let mut built = Vec::with_capacity(self.runtimes.len());
        for runtime in &self.runtimes {
            let config = SourceConfig {
                runtime_id: runtime.id.clone(),
                table: runtime.table.clone(),
                state_dir: self
                    .server
                    .state_dir
                    .join("runtimes")
                    .join(runtime.id.as_str()),
            };
            let source = factories
                .build(&runtime.kind, config)
                .map_err(|e| runtime.factory_error(&e, kinds.contains(&runtime.kind.as_str())))?;
            built.push(BuiltRuntime {
                id: runtime.id.clone(),
                kind: runtime.kind.clone(),
                source,
            });
        }
        Ok(built)
    }

    /// Reads each token's secret from its environment variable or its file; trailing
    /// whitespace (a final newline) is dropped.
    ///
    /// Refused, with an error naming the token (and the variable) but never a secret: an
    /// unset or non-UTF-8 variable, an unreadable file, a token with both or neither
    /// source, an empty secret, a secret shorter than 16 bytes, a secret with characters
    /// other than visible ASCII (it travels in an `Authorization` header), two tokens with
    /// the same name, two tokens with the same secret.
    pub fn load_tokens(&self) -> Result<Vec<LoadedToken>, ConfigFileError> {
        let mut loaded: Vec<LoadedToken> = Vec::with_capacity(self.server.tokens.len());
        for token in &self.server.tokens {
            let name = &token.name;
            if loaded.iter().any(|t| &t.name == name) {
                return Err(ConfigFileError::new(
                    None,
                    format!("token name {name:?} is used twice; token names must be unique"),
                ));
            }
            let read = match (&token.token_env, &token.token_file) {
                (Some(var), None) => match std::env::var(var) {
                    Ok(value) => value,
                    Err(std::env::VarError::NotPresent) => {
                        return Err(ConfigFileError::new(
                            None,
                            format!(
                                "token {name:?}: the environment variable {var} \
                                 (its token_env) is not set"
                            ),
                        ))
                    }
                    Err(std::env::VarError::NotUnicode(_)) => {
                        return Err(ConfigFileError::new(
                            None,
                            format!(
                                "token {name:?}: the environment variable {var} \
                                 (its token_env) is not valid UTF-8"
                            ),
                        ))
                    }
                },
                (None, Some(path)) => fs::read_to_string(path).map_err(|e| {
                    ConfigFileError::new(
                        None,
                        format!("token {name:?}: its token_file cannot be read: {e}"),
                    )
                })?,
                _ => return Err(ConfigFileError::new(None, one_source_message(name))),
            };
            let secret = read.trim_end();
            let from = match &token.token_env {
                Some(var) => format!("the environment variable {var}"),
                None => "its token_file".to_string(),
            };
            if secret.is_empty() {
                return Err(ConfigFileError::new(
                    None,
                    format!("token {name:?}: the secret in {from} is empty"),
                ));
            }
            if secret.len() < MIN_SECRET_LEN {
                return Err(ConfigFileError::new(
                    None,
                    format!(
                        "token {name:?}: the secret in {from} is shorter than \
                         {MIN_SECRET_LEN} bytes; use a long random value"
                    ),
                ));
            }
            if !secret.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigFileError::new(
                    None,
                    format!(
                        "token {name:?}: the secret in {from} holds spaces, control or \
                         non-ASCII characters; it must be visible ASCII to travel in an \
                         Authorization header"
                    ),
                ));
            }
            if let Some(twin) = loaded.iter().find(|t| t.secret == secret) {
                return Err(ConfigFileError::new(
                    None,
                    format!(
                        "tokens {:?} and {name:?} have the same secret; give each its own",
                        twin.name
                    ),
                ));
            }
            loaded.push(LoadedToken {
                name: name.clone(),
                scope: token.scope,
                secret: secret.to_string(),
            });
        }
        Ok(loaded)
    }

    /// Refuses a `listen` address that is not loopback when `tokens` is empty: the API can
    /// start processes, so without tokens anyone who can reach the port could. The message
    /// says how to fix it: configure `[[server.tokens]]`, or listen on `127.0.0.1` or
    /// `[::1]`.
    pub fn check_listen(&self, tokens: &[LoadedToken]) -> Result<(), ConfigFileError> {
        let listen = self.server.listen;
        if !tokens.is_empty() || is_loopback(listen.ip()) {
            return Ok(());
        }
        Err(ConfigFileError::new(
            None,
            format!(
                "refusing to listen on {listen} without tokens: the API can start processes, \
                 so anyone who can reach a non-loopback address could. Configure \
                 [[server.tokens]], or listen on 127.0.0.1 or [::1] (e.g. \
                 listen = \"127.0.0.1:{port}\")",
                port = listen.port()
            ),
        ))
    }
}

/// The runtime a file without `[[runtimes]]` gets.
fn default_runtime() -> RuntimeSection {
    let mut shell = toml::Table::new();
    shell.insert(
        "command".to_string(),
        toml::Value::Array(vec!["/bin/sh".into(), "-c".into()]),
    );
    let mut profiles = toml::Table::new();
    profiles.insert("shell".to_string(), toml::Value::Table(shell));
    let mut table = toml::Table::new();
    table.insert("allow_commands".to_string(), toml::Value::Boolean(true));
    table.insert("profiles".to_string(), toml::Value::Table(profiles));
    RuntimeSection::new(
        // A constant that meets the id rules: this cannot fail.
        RuntimeId::new(DEFAULT_RUNTIME).expect("\"local\" is a valid runtime id"),
        source_embedded::KIND,
        table,
    )
}

/// Checks the runtimes: each has a valid, unique `name` and a string `source`.
/// `elements` are the same tables as `raws` with the spans of their keys.
fn parse_runtimes(
    text: &str,
    raws: Vec<Spanned<toml::Table>>,
    elements: &[&DeTable<'_>],
) -> Result<Vec<RuntimeSection>, ConfigFileError> {
    let mut first_line_of: HashMap<RuntimeId, usize> = HashMap::new();
    let mut runtimes = Vec::with_capacity(raws.len());
    for (i, raw) in raws.into_iter().enumerate() {
        let line = line_of(text, raw.span().start);
        let mut keys = Vec::new();
        if let Some(element) = elements.get(i) {
            index_table(element, "", &mut keys);
        }
        let line_of_key = |name: &str| {
            keys.iter()
                .find(|k| k.is_key && k.path == name)
                .map_or(line, |k| line_of(text, k.key.start))
        };
        let mut table = raw.into_inner();

        let name_line = line_of_key("name");
        let name = match table.remove("name") {
            Some(toml::Value::String(name)) => name,
            Some(other) => {
                return Err(ConfigFileError::new(
                    Some(name_line),
                    format!("`runtimes.name` must be a string, not {}", other.type_str()),
                ))
            }
            None => {
                return Err(ConfigFileError::new(
                    Some(line),
                    "a [[runtimes]] entry has no `name`; give it one, e.g. name = \"local\"",
                ))
            }
        };
        let id = RuntimeId::new(&name)
            .map_err(|e| ConfigFileError::new(Some(name_line), format!("`runtimes.name`: {e}")))?;
        if let Some(first) = first_line_of.get(&id) {
            return Err(ConfigFileError::new(
                Some(name_line),
                format!("runtime name \"{id}\" is used twice (first on line {first})"),
            ));
        }
        first_line_of.insert(id.clone(), name_line);

        let source_line = line_of_key("source");
        let kind = match table.remove("source") {
            Some(toml::Value::String(kind)) => kind,
            Some(other) => {
                return Err(ConfigFileError::new(
                    Some(source_line),
                    format!(
                        "runtime \"{id}\": `source` must be a string, not {}",
                        other.type_str()
                    ),
                ))
            }
            None => {
                return Err(ConfigFileError::new(
                    Some(line),
                    format!(
                        "runtime \"{id}\" has no `source`; give its kind, e.g. \
                         source = \"embedded\""
                    ),
                ))
            }
        };

        let mut key_lines: Vec<KeyLine> = keys
            .iter()
            .filter(|k| k.is_key && k.path != "name" && k.path != "source")
            .map(|k| KeyLine {
                path: k.path.clone(),
                leaf: k.leaf.clone(),
                line: line_of(text, k.key.start),
            })
            .collect();
        key_lines.sort_by_key(|k| k.line);

        runtimes.push(RuntimeSection {
            id,
            kind,
            table,
            line,
            source_line,
            keys: key_lines,
        });
    }
    Ok(runtimes)
}

/// The checks on `[server]` that serde does not make. The allowed hosts are written back
/// in the form the server compares (see [`allowed_host`]).
fn check_server(
    server: &mut ServerSection,
    text: &str,
    index: &[KeySpan],
) -> Result<(), ConfigFileError> {
    let key_line = |path: &str| {
        index
            .iter()
            .find(|k| k.is_key && k.path == path)
            .map(|k| line_of(text, k.key.start))
    };
    let zero = |key: &str, what: &str| {
        ConfigFileError::new(
            key_line(&format!("server.{key}")),
            format!("`server.{key}` must be at least {what}"),
        )
    };
    if server.state_dir.as_os_str().is_empty() {
        return Err(ConfigFileError::new(
            key_line("server.state_dir"),
            "`server.state_dir` is empty; give a directory, e.g. \"/var/lib/roster\", or \
             leave the key out for the default ./.roster",
        ));
    }
    if server.max_body == 0 {
        return Err(zero("max_body", "1 byte"));
    }
    if server.sse_ping < MIN_SSE_PING {
        return Err(zero("sse_ping", "1ms"));
    }
    if server.sse_ping > MAX_INTERVAL {
        return Err(ConfigFileError::new(
            key_line("server.sse_ping"),
            "`server.sse_ping` must be at most 1h".to_string(),
        ));
    }
    if server.shutdown_grace > MAX_INTERVAL {
        return Err(ConfigFileError::new(
            key_line("server.shutdown_grace"),
            "`server.shutdown_grace` must be at most 1h".to_string(),
        ));
    }
    if server.event_retention == 0 {
        return Err(zero("event_retention", "1"));
    }
    if server.event_retention_bytes == 0 {
        return Err(zero("event_retention_bytes", "1 byte"));
    }
    if server.subscriber_queue == 0 {
        return Err(zero("subscriber_queue", "1"));
    }
    if server.subscriber_queue > MAX_SUBSCRIBER_QUEUE {
        return Err(ConfigFileError::new(
            key_line("server.subscriber_queue"),
            format!("`server.subscriber_queue` must be at most {MAX_SUBSCRIBER_QUEUE}"),
        ));
    }

    for host in &mut server.allowed_hosts {
        *host = allowed_host(host).map_err(|message| {
            ConfigFileError::new(
                key_line("server.allowed_hosts"),
                format!("`server.allowed_hosts`: {message}"),
            )
        })?;
    }
    for origin in &server.allowed_origins {
        if !is_origin(origin) {
            return Err(ConfigFileError::new(
                key_line("server.allowed_origins"),
                format!(
                    "`server.allowed_origins`: {origin:?} is not an origin; write \
                     scheme://host[:port] without a path or a trailing slash, e.g. \
                     \"https://console.example\""
                ),
            ));
        }
        if let Some(port) = origin_port(origin).filter(|p| is_default_port(origin, p)) {
            let port = if port.is_empty() {
                "an empty port".to_string()
            } else {
                format!("the default port {port}")
            };
            return Err(ConfigFileError::new(
                key_line("server.allowed_origins"),
                format!(
                    "`server.allowed_origins`: {origin:?} has {port}, which browsers never \
                     send in an Origin; drop the port, e.g. \"{}\"",
                    without_port(origin)
                ),
            ));
        }
    }

    let token_lines: Vec<usize> = index
        .iter()
        .filter(|k| !k.is_key && k.path == "server.tokens")
        .map(|k| line_of(text, k.key.start))
        .collect();
    let mut first_line_of: HashMap<&str, Option<usize>> = HashMap::new();
    for (i, token) in server.tokens.iter().enumerate() {
        let line = token_lines.get(i).copied();
        if token.name.is_empty() {
            return Err(ConfigFileError::new(
                line,
                "a [[server.tokens]] entry has an empty `name`",
            ));
        }
        if let Some(first) = first_line_of.get(token.name.as_str()) {
            let first = first.map_or_else(String::new, |l| format!(" (first on line {l})"));
            return Err(ConfigFileError::new(
                line,
                format!("token name {:?} is used twice{first}", token.name),
            ));
        }
        first_line_of.insert(&token.name, line);
        if token.token_env.is_some() == token.token_file.is_some() {
            return Err(ConfigFileError::new(line, one_source_message(&token.name)));
        }
        if token.token_env.as_deref() == Some("") {
            return Err(ConfigFileError::new(
                line,
                format!("token {:?}: `token_env` is empty", token.name),
            ));
        }
    }
    Ok(())
}

/// The message for a token with both or neither of `token_env` and `token_file`.
fn one_source_message(name: &str) -> String {
    format!(
        "token {name:?} needs exactly one of `token_env` (an environment variable) or \
         `token_file` (a file) to hold its secret"
    )
}

/// `entry` of `allowed_hosts` in the form the server compares a `Host` header in: lower
/// case, without trailing dots, an IPv6 address without its brackets. An entry that could
/// never match is an error message naming it: an empty one, one with a port (the port is
/// not compared), one that is not a bare host name.
fn allowed_host(entry: &str) -> Result<String, String> {
    let not_a_name = || {
        format!(
            "{entry:?} is not a host name; write the bare name, e.g. \"roster.internal\", or \
             an IP address"
        )
    };
    if entry.contains(['/', '@']) || entry.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(not_a_name());
    }
    let lower = entry.to_ascii_lowercase();
    let host = match lower.strip_prefix('[') {
        Some(rest) => match rest.strip_suffix(']') {
            Some(inside) if inside.parse::<Ipv6Addr>().is_ok() => inside,
            _ if rest.contains("]:") => return Err(with_port(entry)),
            _ => return Err(not_a_name()),
        },
        None => lower.trim_end_matches('.'),
    };
    if host.is_empty() {
        return Err(format!(
            "{entry:?} is empty; write a host name, e.g. \"roster.internal\""
        ));
    }
    if host.contains(':') && host.parse::<Ipv6Addr>().is_err() {
        return Err(
            if host.contains(['[', ']']) || host.matches(':').count() > 1 {
                not_a_name()
            } else {
                with_port(entry)
            },
        );
    }
    if host.contains(['[', ']']) {
        return Err(not_a_name());
    }
    Ok(host.to_string())
}

/// The message for an `allowed_hosts` entry with a port.
fn with_port(entry: &str) -> String {
    format!(
        "{entry:?} has a port, but a Host header is compared without its port, so this \
         entry would never match; drop the port, e.g. \"roster.internal\" or \"[fd00::1]\""
    )
}

/// The port of an origin written `scheme://host:port` (empty for `scheme://host:`), or
/// `None` without one.
fn origin_port(origin: &str) -> Option<&str> {
    let (_, authority) = origin.split_once("://")?;
    let after_host = match authority.strip_prefix('[') {
        Some(rest) => &rest[rest.find(']')? + 1..],
        None => authority,
    };
    after_host.rsplit_once(':').map(|(_, port)| port)
}

/// Whether `port`, written in `origin`, is one a browser leaves out of an `Origin`: empty,
/// or the default port of an `http` or `https` origin.
fn is_default_port(origin: &str, port: &str) -> bool {
    if port.is_empty() {
        return true;
    }
    let scheme = origin.split_once("://").map_or("", |(s, _)| s);
    let default = if scheme.eq_ignore_ascii_case("http") {
        80
    } else if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        return false;
    };
    port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>() == Ok(default)
}

/// `origin` without its port (and the `:` before it).
fn without_port(origin: &str) -> &str {
    match origin_port(origin) {
        Some(port) => &origin[..origin.len() - port.len() - 1],
        None => origin,
    }
}

/// Whether `origin` is `scheme://host[:port]` with nothing after the authority and, if it
/// has a port, a port number (an empty port is left to the caller, which says to drop it).
fn is_origin(origin: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && !authority.is_empty()
        && !authority.contains(['/', '?', '#', '@'])
        && !authority
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        && origin_port(origin).is_none_or(|port| {
            port.is_empty()
                || (port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok())
        })
}

/// The shortest `sse_ping`.
const MIN_SSE_PING: Duration = Duration::from_millis(1);

/// The longest `sse_ping` and `shutdown_grace`.
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// Whether `ip` is a loopback address, an IPv4-mapped IPv6 one included.
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Where a key, or an element of an array, sits in the text.
struct KeySpan {
    /// The dotted path, e.g. `server.tokens` (array elements have the array's path).
    path: String,
    /// The last part of the path.
    leaf: String,
    /// A key (else an array element).
    is_key: bool,
    /// The span of the key (for an element: of the element, or its `[[…]]` header).
    key: Range<usize>,
    /// The span of the value (for a table: its header, if it has one).
    value: Range<usize>,
}

/// Adds every key of `table`, at any depth, to `out`.
fn index_table(table: &DeTable<'_>, prefix: &str, out: &mut Vec<KeySpan>) {
    for (key, value) in table.iter() {
        let leaf = key.get_ref().to_string();
        let path = if prefix.is_empty() {
            leaf.clone()
        } else {
            format!("{prefix}.{leaf}")
        };
        out.push(KeySpan {
            path: path.clone(),
            leaf: leaf.clone(),
            is_key: true,
            key: key.span(),
            value: value.span(),
        });
        index_value(value, &path, &leaf, out);
    }
}

/// Adds the keys inside `value` (a table or an array) to `out`.
fn index_value(value: &Spanned<DeValue<'_>>, path: &str, leaf: &str, out: &mut Vec<KeySpan>) {
    match value.get_ref() {
        DeValue::Table(table) => index_table(table, path, out),
        DeValue::Array(array) => {
            for element in array.iter() {
                out.push(KeySpan {
                    path: path.to_string(),
                    leaf: leaf.to_string(),
                    is_key: false,
                    key: element.span(),
                    value: element.span(),
                });
                index_value(element, path, leaf, out);
            }
        }
        _ => {}
    }
}

/// The innermost key or element whose span holds byte `at`.
fn locate(index: &[KeySpan], at: usize) -> Option<&KeySpan> {
    let holds = |r: &Range<usize>| r.contains(&at) || (r.is_empty() && r.start == at);
    index
        .iter()
        .filter_map(|k| {
            let span = if holds(&k.key) {
                &k.key
            } else if holds(&k.value) {
                &k.value
            } else {
                return None;
            };
            Some((span.len(), std::cmp::Reverse(k.path.len()), k))
        })
        .min_by_key(|(len, depth, _)| (*len, *depth))
        .map(|(_, _, k)| k)
}

/// A TOML syntax error, at its line.
fn syntax_error(text: &str, err: &toml::de::Error) -> ConfigFileError {
    let message = err.message().trim();
    let Some(span) = err.span() else {
        return ConfigFileError::new(None, format!("invalid TOML: {message}"));
    };
    let found = text
        .get(span.clone())
        .filter(|s| !s.is_empty() && s.len() <= 64 && !s.contains('\n'));
    let message = match found {
        Some(found) if message == "duplicate key" => format!("duplicate key `{found}`"),
        _ => format!("invalid TOML: {message}"),
    };
    ConfigFileError::new(Some(line_of(text, span.start)), message)
}

/// An error of serde on the parsed file: at its line, naming the key.
fn value_error(text: &str, index: &[KeySpan], err: &toml::de::Error) -> ConfigFileError {
    let message = err.message().trim();
    let Some(span) = err.span() else {
        return ConfigFileError::new(None, message);
    };
    let message = match locate(index, span.start) {
        Some(key) if message.contains(&format!("`{}`", key.leaf)) => match parent(&key.path) {
            Some(parent) if key.is_key => format!("in `{parent}`: {message}"),
            _ => message.to_string(),
        },
        Some(key) => format!("`{}`: {message}", key.path),
        None => message.to_string(),
    };
    ConfigFileError::new(Some(line_of(text, span.start)), message)
}

/// The 1-based line of byte `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    let end = at.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// `Some(line)` for a line from a file, `None` for 0.
fn known_line(line: usize) -> Option<usize> {
    (line > 0).then_some(line)
}

/// The path without its last part, if it has more than one.
fn parent(path: &str) -> Option<&str> {
    path.rsplit_once('.').map(|(parent, _)| parent)
}

/// `message` split before its trailing ``in `P` `` (the table or key it is about, as toml
/// ends its messages): the text before it and `P`. `None` when it does not end so.
fn split_context(message: &str) -> Option<(&str, &str)> {
    let body = message.strip_suffix('`')?;
    let open = body.rfind('`')?;
    let context = &body[open + 1..];
    let head = body[..open].strip_suffix("in ")?;
    let separated = head.is_empty() || head.ends_with(char::is_whitespace);
    (separated && !context.is_empty()).then_some((head.trim_end(), context))
}

/// The `backtick-quoted` parts of `message`, in order.
fn backticked(message: &str) -> impl Iterator<Item = &str> {
    message.split('`').skip(1).step_by(2)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;

    use registry_core::{OutputEvent, OutputRequest, SpawnRequest};

    use super::*;

    fn parse_err(text: &str) -> ConfigFileError {
        match Config::parse(text) {
            Ok(config) => panic!("expected an error, got {config:?}"),
            Err(e) => e,
        }
    }

    fn embedded() -> SourceFactories {
        let mut factories = SourceFactories::new();
        factories.add::<source_embedded::EmbeddedSource>().unwrap();
        factories
    }

    fn build_err(text: &str) -> ConfigFileError {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::parse(text).unwrap();
        config.server.state_dir = dir.path().to_path_buf();
        match config.build_sources(&embedded()) {
            Ok(built) => panic!("expected an error, got {built:?}"),
            Err(e) => e,
        }
    }

    fn token(name: &str, env: Option<&str>, file: Option<&Path>) -> TokenSection {
        TokenSection {
            name: name.to_string(),
            scope: Scope::Operate,
            token_env: env.map(str::to_string),
            token_file: file.map(Path::to_path_buf),
        }
    }

    fn with_tokens(tokens: Vec<TokenSection>) -> Config {
        let mut config = Config::default_embedded();
        config.server.tokens = tokens;
        config
    }

    fn load_err(config: &Config) -> ConfigFileError {
        match config.load_tokens() {
            Ok(tokens) => panic!("expected an error, got {tokens:?}"),
            Err(e) => e,
        }
    }

    fn assert_server_defaults(server: &ServerSection) {
        assert_eq!(server.listen, DEFAULT_LISTEN.parse::<SocketAddr>().unwrap());
        assert_eq!(server.state_dir, PathBuf::from("./.roster"));
        assert!(server.tokens.is_empty());
        assert!(server.allowed_hosts.is_empty());
        assert!(server.allowed_origins.is_empty());
        assert_eq!(server.max_body, 1 << 20);
        assert_eq!(server.shutdown_grace, Duration::from_secs(10));
        assert_eq!(server.sse_ping, Duration::from_secs(15));
        assert_eq!(server.event_retention, 10_000);
        assert_eq!(server.event_retention_bytes, 64 << 20);
        assert_eq!(server.subscriber_queue, 1024);
    }

    fn assert_default_runtime(runtimes: &[RuntimeSection]) {
        assert_eq!(runtimes.len(), 1);
        let local = &runtimes[0];
        assert_eq!(local.id.as_str(), "local");
        assert_eq!(local.kind, "embedded");
        assert_eq!(local.table["allow_commands"], toml::Value::Boolean(true));
        assert_eq!(
            local.table["profiles"]["shell"]["command"],
            toml::Value::Array(vec!["/bin/sh".into(), "-c".into()])
        );
        assert_eq!(local.line, 0);
    }

    // ---- defaults ----

    #[test]
    fn default_embedded_matches_spec_section_8() {
        let config = Config::default_embedded();
        assert_server_defaults(&config.server);
        assert_default_runtime(&config.runtimes);
    }

    #[test]
    fn an_empty_file_gets_the_defaults_and_the_local_runtime() {
        for text in ["", "\n# nothing here\n", "runtimes = []\n"] {
            let config = Config::parse(text).unwrap();
            assert_server_defaults(&config.server);
            assert_default_runtime(&config.runtimes);
        }
    }

    #[test]
    fn a_file_with_only_server_keeps_the_local_runtime() {
        let config = Config::parse("[server]\nlisten = \"127.0.0.1:9000\"\n").unwrap();
        assert_eq!(config.server.listen.port(), 9000);
        assert_eq!(config.server.sse_ping, Duration::from_secs(15));
        assert_default_runtime(&config.runtimes);
    }

    #[test]
    fn every_server_key_is_read() {
        let config = Config::parse(
            r#"
[server]
listen = "[::1]:8000"
state_dir = "/var/lib/roster"
allowed_hosts = ["roster.internal"]
allowed_origins = ["https://console.example", "http://localhost:3000"]
max_body = "512KiB"
shutdown_grace = "3s"
sse_ping = "500ms"
event_retention = 50
event_retention_bytes = 4096
subscriber_queue = 8
[[server.tokens]]
name = "console"
scope = "operate"
token_env = "ROSTER_CONSOLE_TOKEN"
[[server.tokens]]
name = "viewer"
scope = "read"
token_file = "/etc/roster/viewer.token"
"#,
        )
        .unwrap();
        let s = &config.server;
        assert_eq!(s.listen, "[::1]:8000".parse::<SocketAddr>().unwrap());
        assert_eq!(s.state_dir, PathBuf::from("/var/lib/roster"));
        assert_eq!(s.allowed_hosts, ["roster.internal"]);
        assert_eq!(
            s.allowed_origins,
            ["https://console.example", "http://localhost:3000"]
        );
        assert_eq!(s.max_body, 512 << 10);
        assert_eq!(s.shutdown_grace, Duration::from_secs(3));
        assert_eq!(s.sse_ping, Duration::from_millis(500));
        assert_eq!(s.event_retention, 50);
        assert_eq!(s.event_retention_bytes, 4096);
        assert_eq!(s.subscriber_queue, 8);
        assert_eq!(s.tokens.len(), 2);
        assert_eq!(s.tokens[0].name, "console");
        assert_eq!(s.tokens[0].scope, Scope::Operate);
        assert_eq!(
            s.tokens[0].token_env.as_deref(),
            Some("ROSTER_CONSOLE_TOKEN")
        );
        assert_eq!(s.tokens[1].scope, Scope::Read);
        assert_eq!(
            s.tokens[1].token_file.as_deref(),
            Some(Path::new("/etc/roster/viewer.token"))
        );
    }

    #[test]
    fn the_spec_example_parses_with_runtime_tables_without_name_and_source() {
        let text = r#"[server]
listen = "127.0.0.1:7411"
state_dir = "/var/lib/roster"
[[server.tokens]]
name = "console"
scope = "operate"
token_env = "ROSTER_CONSOLE_TOKEN"

[[runtimes]]
name = "local"
source = "embedded"
max_workers = 256
[runtimes.profiles.shell]
command = ["/bin/sh", "-c"]

[[runtimes]]
name = "gpu-box"
source = "remote"
url = "http://gpu-box.internal:7411"
remote_runtime = "local"
token_env = "GPU_BOX_TOKEN"

[[runtimes]]
name = "legacy"
source = "local"
spool_dir = "/run/legacy-workers"
"#;
        let config = Config::parse(text).unwrap();
        let ids: Vec<_> = config.runtimes.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["local", "gpu-box", "legacy"]);
        let kinds: Vec<_> = config.runtimes.iter().map(|r| r.kind.as_str()).collect();
        assert_eq!(kinds, ["embedded", "remote", "local"]);
        let lines: Vec<_> = config.runtimes.iter().map(|r| r.line).collect();
        assert_eq!(lines, [9, 16, 23]);
        let local = &config.runtimes[0];
        assert!(!local.table.contains_key("name") && !local.table.contains_key("source"));
        assert_eq!(local.table["max_workers"], toml::Value::Integer(256));
        assert_eq!(
            config.runtimes[1].table["url"],
            toml::Value::String("http://gpu-box.internal:7411".into())
        );
    }

    #[test]
    fn an_inline_runtime_gets_the_line_of_its_table() {
        let config =
            Config::parse("\nruntimes = [\n  { name = \"a\", source = \"embedded\" },\n]\n")
                .unwrap();
        assert_eq!(config.runtimes[0].id.as_str(), "a");
        assert_eq!(config.runtimes[0].line, 3);
    }

    #[tokio::test]
    async fn default_embedded_builds_a_working_source() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default_embedded();
        config.server.state_dir = dir.path().to_path_buf();
        let built = config.build_sources(&embedded()).unwrap();
        assert_eq!(built.len(), 1);
        assert_eq!(built[0].id.as_str(), "local");
        assert_eq!(built[0].kind, "embedded");
        let source = &built[0].source;

        let worker = source
            .spawn(SpawnRequest {
                profile: Some("shell".into()),
                args: vec!["echo configured".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        let mut output = source
            .output(
                &worker.key,
                OutputRequest {
                    after: 0,
                    follow: true,
                },
            )
            .await
            .unwrap();
        let mut text = Vec::new();
        while let Some(event) = output.recv().await {
            if let OutputEvent::Chunk(chunk) = event {
                text.extend_from_slice(&chunk.data);
            }
        }
        assert_eq!(text, b"configured\n");
        // allow_commands = true in the default runtime.
        source
            .spawn(SpawnRequest {
                command: Some(vec!["/bin/true".into()]),
                ..Default::default()
            })
            .await
            .unwrap();
        source.shutdown(Some(Duration::ZERO)).await;
    }

    #[test]
    fn each_runtime_gets_its_table_and_a_state_dir_under_runtimes() {
        let seen: Arc<Mutex<Vec<SourceConfig>>> = Arc::default();
        let mut factories = SourceFactories::new();
        let record = Arc::clone(&seen);
        factories
            .register("probe", move |config: SourceConfig| {
                let runtime = config.runtime_id.to_string();
                record.lock().unwrap().push(config);
                Err(ConfigError {
                    runtime,
                    message: "recorded".into(),
                })
            })
            .unwrap();
        let config = Config::parse(
            "[server]\nstate_dir = \"/srv/roster\"\n[[runtimes]]\nname = \"p\"\nsource = \"probe\"\nx = 1\n",
        )
        .unwrap();
        let err = config.build_sources(&factories).unwrap_err();
        assert_eq!(err.line, Some(3));
        assert_eq!(err.message, "runtime \"p\": recorded");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].runtime_id.as_str(), "p");
        assert_eq!(seen[0].state_dir, Path::new("/srv/roster/runtimes/p"));
        assert_eq!(seen[0].table.keys().collect::<Vec<_>>(), ["x"]);
    }

    /// Factories that fail every runtime with `message`.
    fn failing_with(message: &'static str) -> SourceFactories {
        let mut factories = SourceFactories::new();
        factories
            .register("probe", move |config: SourceConfig| {
                Err(ConfigError {
                    runtime: config.runtime_id.to_string(),
                    message: message.to_string(),
                })
            })
            .unwrap();
        factories
    }

    #[test]
    fn a_factory_error_naming_a_key_path_gets_that_keys_line() {
        let config = Config::parse(
            "[[runtimes]]\nname = \"p\"\nsource = \"probe\"\ncommand = 1\n\
             [runtimes.profiles.shell]\ncommand = 5\n",
        )
        .unwrap();
        let factories = failing_with(
            "invalid type: integer `5`, expected a sequence\nin `profiles.shell.command`",
        );
        let err = config.build_sources(&factories).unwrap_err();
        assert_eq!(err.line, Some(6), "{err}");
        assert!(
            err.message.starts_with("runtime \"p\": invalid type"),
            "{err}"
        );
        let err = config
            .build_sources(&failing_with("`command` is wrong"))
            .unwrap_err();
        assert_eq!(err.line, Some(4), "{err}");
    }

    /// A runtime `p` of kind `probe` with two profiles: `a` (header on line 5, `command` on
    /// 6) and `b` (header on 7, `cwd` on 8).
    const TWO_PROFILES: &str = "[[runtimes]]\nname = \"p\"\nsource = \"probe\"\nmax = 1\n\
                                [runtimes.profiles.a]\ncommand = [\"/bin/true\"]\n\
                                [runtimes.profiles.b]\ncwd = \"/tmp\"\n";

    #[test]
    fn a_factory_error_about_a_table_is_placed_in_that_table() {
        let config = Config::parse(TWO_PROFILES).unwrap();
        // The key is missing from `b`: at `b`'s header, not at `a`'s `command`.
        let err = config
            .build_sources(&failing_with("missing field `command` in `profiles.b`"))
            .unwrap_err();
        assert_eq!(err.line, Some(7), "{err}");
        assert_eq!(
            err.message,
            "runtime \"p\": missing field `command` in `profiles.b`"
        );
        // A key of `b` the message names: at its line.
        let err = config
            .build_sources(&failing_with(
                "unknown field `cwd`, expected one of `command`, `env` in `profiles.b`",
            ))
            .unwrap_err();
        assert_eq!(err.line, Some(8), "{err}");
        assert!(!err.message.contains("profiles.a"), "{err}");
        // The table is named once.
        assert_eq!(err.message.matches("profiles.b").count(), 1, "{err}");
        // A key path as the context: at that key.
        let err = config
            .build_sources(&failing_with(
                "invalid type: integer `5`, expected a sequence\nin `profiles.a.command`",
            ))
            .unwrap_err();
        assert_eq!(err.line, Some(6), "{err}");
    }

    #[test]
    fn a_factory_error_about_an_unknown_table_falls_back_to_the_runtime_line() {
        let config = Config::parse(TWO_PROFILES).unwrap();
        // `command` is a key of `a`, but the message is about `c`, which is not written.
        let err = config
            .build_sources(&failing_with("missing field `command` in `profiles.c`"))
            .unwrap_err();
        assert_eq!(err.line, Some(1), "{err}");
        assert_eq!(
            err.message,
            "runtime \"p\": missing field `command` in `profiles.c`"
        );
    }

    #[test]
    fn a_factory_error_without_a_table_names_the_table_of_the_nested_key_it_names() {
        let config = Config::parse(
            "[[runtimes]]\nname = \"p\"\nsource = \"probe\"\n\
             [runtimes.profiles.a]\ncwd = \"/\"\n[runtimes.more]\ncwd = \"/\"\n",
        )
        .unwrap();
        // Only nested keys have the name: the first one, with its table named.
        let err = config
            .build_sources(&failing_with("`cwd` is wrong"))
            .unwrap_err();
        assert_eq!(err.line, Some(5), "{err}");
        assert_eq!(
            err.message,
            "runtime \"p\": in `profiles.a`: `cwd` is wrong"
        );
    }

    #[test]
    fn a_trailing_table_is_split_from_a_message() {
        assert_eq!(
            split_context("missing field `command` in `profiles.b`"),
            Some(("missing field `command`", "profiles.b"))
        );
        assert_eq!(
            split_context("invalid type: integer `5`\nin `profiles.a.command`"),
            Some(("invalid type: integer `5`", "profiles.a.command"))
        );
        assert_eq!(split_context("in `x`"), Some(("", "x")));
        for message in [
            "unknown field `maxworkers`, expected `max_workers`",
            "`command` is wrong",
            "see `x`",
            "the value within `x`",
            "empty in ``",
            "no key",
        ] {
            assert_eq!(split_context(message), None, "{message}");
        }
    }

    // ---- unknown keys ----

    #[test]
    fn an_unknown_key_in_server_names_the_key_and_the_line() {
        let err = parse_err("[server]\nlisten = \"127.0.0.1:1\"\nlisen = \"x\"\n");
        assert_eq!(err.line, Some(3));
        assert!(err.message.contains("`lisen`"), "{err}");
        assert!(err.message.contains("server"), "{err}");
        assert!(err.to_string().starts_with("line 3: "), "{err}");
    }

    #[test]
    fn an_unknown_top_level_table_or_key_is_an_error() {
        let err = parse_err("# roster\n[sever]\nlisten = \"127.0.0.1:1\"\n");
        assert_eq!(err.line, Some(2));
        assert!(err.message.contains("`sever`"), "{err}");
        let err = parse_err("[server]\n\n[[runtime]]\nname = \"a\"\n");
        assert_eq!(err.line, Some(3));
        assert!(err.message.contains("`runtime`"), "{err}");
        let err = parse_err("verbose = true\n");
        assert_eq!(err.line, Some(1));
        assert!(err.message.contains("`verbose`"), "{err}");
    }

    #[test]
    fn an_unknown_key_in_a_token_names_the_key_and_the_line() {
        let err = parse_err(
            "[server]\n[[server.tokens]]\nname = \"a\"\nscope = \"read\"\ntoken = \"inline\"\n",
        );
        assert_eq!(err.line, Some(5));
        assert!(err.message.contains("`token`"), "{err}");
        assert!(err.message.contains("server.tokens"), "{err}");
    }

    #[test]
    fn an_unknown_key_in_a_runtime_table_names_the_key_and_its_line() {
        let text = "[server]\n\n[[runtimes]]\nname = \"local\"\nsource = \"embedded\"\n\
                    max_workers = 4\nmaxworkers = 3\n";
        let err = build_err(text);
        assert_eq!(err.line, Some(7), "{err}");
        assert!(err.message.contains("`maxworkers`"), "{err}");
        assert!(err.message.contains("runtime \"local\""), "{err}");
        assert!(err.to_string().contains("line 7"), "{err}");
    }

    #[test]
    fn an_unknown_key_in_a_nested_profile_names_the_key_and_its_line() {
        let text = "[[runtimes]]\nname = \"local\"\nsource = \"embedded\"\n\
                    [runtimes.profiles.ok]\ncommand = [\"/bin/true\"]\n\
                    [runtimes.profiles.shell]\ncomand = [\"/bin/sh\", \"-c\"]\n";
        let err = build_err(text);
        assert_eq!(err.line, Some(7), "{err}");
        assert!(err.message.contains("`comand`"), "{err}");
        assert!(err.message.contains("profiles.shell"), "{err}");
    }

    #[tokio::test]
    async fn an_unknown_key_in_the_second_runtime_gets_that_runtimes_line() {
        let text = "[[runtimes]]\nname = \"a\"\nsource = \"embedded\"\n\
                    [[runtimes]]\nname = \"b\"\nsource = \"embedded\"\nbogus = 1\n";
        let err = build_err(text);
        assert_eq!(err.line, Some(7), "{err}");
        assert!(err.message.contains("runtime \"b\""), "{err}");
        assert!(err.message.contains("`bogus`"), "{err}");
    }

    #[test]
    fn a_runtime_error_naming_no_key_falls_back_to_the_runtime_line() {
        // The factory's message for a wrong type does not name the key.
        let text = "[server]\n[[runtimes]]\nname = \"local\"\nsource = \"embedded\"\n\
                    max_workers = \"many\"\n";
        let err = build_err(text);
        assert!(matches!(err.line, Some(2) | Some(5)), "{err}");
        assert!(err.message.contains("runtime \"local\""), "{err}");
        assert!(err.message.contains("invalid type"), "{err}");
    }

    // ---- wrong values in [server] ----

    #[test]
    fn a_wrong_type_names_the_key_and_the_line() {
        let err = parse_err("[server]\nlisten = 5\n");
        assert_eq!(err.line, Some(2));
        assert!(err.message.contains("`server.listen`"), "{err}");
        let err = parse_err("[server]\n\nevent_retention = \"lots\"\n");
        assert_eq!(err.line, Some(3));
        assert!(err.message.contains("`server.event_retention`"), "{err}");
        let err = parse_err("[server]\nallowed_hosts = [\"a\", 5]\n");
        assert_eq!(err.line, Some(2));
        assert!(err.message.contains("`server.allowed_hosts`"), "{err}");
        let err = parse_err("server = 1\n");
        assert_eq!(err.line, Some(1));
        assert!(err.message.contains("`server`"), "{err}");
    }

    #[test]
    fn a_bad_duration_names_the_key_and_the_line() {
        let err = parse_err("[server]\nsse_ping = \"15s\"\nshutdown_grace = \"soon\"\n");
        assert_eq!(err.line, Some(3));
        assert!(err.message.contains("`server.shutdown_grace`"), "{err}");
        assert!(err.message.contains("not a duration"), "{err}");
    }

    #[test]
    fn a_bad_byte_size_names_the_key_and_the_line() {
        let err = parse_err("[server]\nmax_body = \"lots\"\n");
        assert_eq!(err.line, Some(2));
        assert!(err.message.contains("`server.max_body`"), "{err}");
        assert!(err.message.contains("not a size"), "{err}");
        let err = parse_err("[server]\n\nevent_retention_bytes = \"1.5MiB\"\n");
        assert_eq!(err.line, Some(3));
        assert!(
            err.message.contains("`server.event_retention_bytes`"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_listen_address_names_the_key_and_the_line() {
        let err = parse_err("[server]\nlisten = \"localhost\"\n");
        assert_eq!(err.line, Some(2));
        assert!(err.message.contains("`server.listen`"), "{err}");
        assert!(err.message.contains("address"), "{err}");
    }

    #[test]
    fn zero_limits_are_refused_at_their_line() {
        for (key, value) in [
            ("max_body", "0"),
            ("sse_ping", "\"0s\""),
            ("event_retention", "0"),
            ("event_retention_bytes", "0"),
            ("subscriber_queue", "0"),
        ] {
            let err = parse_err(&format!("[server]\n{key} = {value}\n"));
            assert_eq!(err.line, Some(2), "{err}");
            assert!(err.message.contains(&format!("`server.{key}`")), "{err}");
        }
        let config = Config::parse("[server]\nshutdown_grace = \"0s\"\n").unwrap();
        assert_eq!(config.server.shutdown_grace, Duration::ZERO);
    }

    #[test]
    fn allowed_hosts_and_origins_must_be_bare() {
        let err = parse_err("[server]\nallowed_hosts = [\"https://roster.internal\"]\n");
        assert_eq!(err.line, Some(2));
        assert!(err.message.contains("allowed_hosts"), "{err}");
        for origin in ["https://console.example/", "console.example", "null", "*"] {
            let err = parse_err(&format!("[server]\n\nallowed_origins = [\"{origin}\"]\n"));
            assert_eq!(err.line, Some(3), "{err}");
            assert!(err.message.contains("allowed_origins"), "{err}");
        }
        Config::parse("[server]\nallowed_origins = [\"http://127.0.0.1:3000\"]\n").unwrap();
    }

    #[test]
    fn allowed_hosts_are_kept_as_the_server_compares_them() {
        let config = Config::parse(
            "[server]\nallowed_hosts = [\"Roster.Internal.\", \"[FD00::1]\", \"fd00::2\", \
             \"10.0.0.1\"]\n",
        )
        .unwrap();
        assert_eq!(
            config.server.allowed_hosts,
            ["roster.internal", "fd00::1", "fd00::2", "10.0.0.1"]
        );
    }

    #[test]
    fn allowed_hosts_that_could_never_match_are_refused_naming_the_entry() {
        for (entry, says) in [
            ("roster.internal:7411", "drop the port"),
            ("roster.internal:", "drop the port"),
            ("10.0.0.1:80", "drop the port"),
            ("[fd00::1]:7411", "drop the port"),
            ("", "empty"),
            (".", "empty"),
            ("[roster.internal]", "not a host name"),
            ("[fd00::1", "not a host name"),
            ("a:b:c", "not a host name"),
            ("roster]internal", "not a host name"),
        ] {
            let err = parse_err(&format!(
                "[server]\nlisten = \"127.0.0.1:1\"\nallowed_hosts = [\"ok\", \"{entry}\"]\n"
            ));
            assert_eq!(err.line, Some(3), "{err}");
            assert!(err.message.contains("`server.allowed_hosts`"), "{err}");
            assert!(err.message.contains(&format!("{entry:?}")), "{err}");
            assert!(err.message.contains(says), "{entry:?}: {err}");
        }
    }

    #[test]
    fn allowed_origins_with_a_port_browsers_never_send_are_refused() {
        for (origin, fixed) in [
            ("http://console.example:80", "http://console.example"),
            ("https://console.example:443", "https://console.example"),
            ("HTTPS://console.example:0443", "HTTPS://console.example"),
            ("https://console.example:", "https://console.example"),
            ("http://[::1]:80", "http://[::1]"),
        ] {
            let err = parse_err(&format!("[server]\n\nallowed_origins = [\"{origin}\"]\n"));
            assert_eq!(err.line, Some(3), "{err}");
            assert!(err.message.contains(&format!("{origin:?}")), "{err}");
            assert!(err.message.contains("drop the port"), "{err}");
            assert!(err.message.contains(&format!("{fixed:?}")), "{err}");
        }
        for origin in ["https://console.example:99999", "https://console.example:x"] {
            let err = parse_err(&format!("[server]\nallowed_origins = [\"{origin}\"]\n"));
            assert_eq!(err.line, Some(2), "{err}");
            assert!(err.message.contains("not an origin"), "{err}");
        }
        let config = Config::parse(
            "[server]\nallowed_origins = [\"http://console.example:443\", \
             \"https://console.example:80\", \"http://[::1]:3000\", \"http://[::1]\"]\n",
        )
        .unwrap();
        assert_eq!(config.server.allowed_origins.len(), 4);
    }

    #[test]
    fn an_sse_ping_below_1ms_is_refused_and_1ms_is_accepted() {
        for value in ["1ns", "999us"] {
            let err = parse_err(&format!("[server]\nsse_ping = \"{value}\"\n"));
            assert_eq!(err.line, Some(2), "{err}");
            assert!(err.message.contains("at least 1ms"), "{err}");
        }
        let config = Config::parse("[server]\nsse_ping = \"1ms\"\n").unwrap();
        assert_eq!(config.server.sse_ping, Duration::from_millis(1));
    }

    #[test]
    fn an_empty_state_dir_is_refused_at_its_line() {
        let err = parse_err("[server]\nlisten = \"127.0.0.1:1\"\nstate_dir = \"\"\n");
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.message.contains("`server.state_dir` is empty"), "{err}");
    }

    #[test]
    fn a_subscriber_queue_over_the_maximum_is_refused_at_its_line() {
        let config = Config::parse("[server]\nsubscriber_queue = 1048576\n").unwrap();
        assert_eq!(config.server.subscriber_queue, 1 << 20);
        for value in ["1048577", "9223372036854775807"] {
            let err = parse_err(&format!("[server]\n\nsubscriber_queue = {value}\n"));
            assert_eq!(err.line, Some(3), "{err}");
            assert!(err.message.contains("`server.subscriber_queue`"), "{err}");
            assert!(err.message.contains("at most 1048576"), "{err}");
        }
    }

    #[test]
    fn a_syntax_error_has_its_line() {
        let err = parse_err("[server]\nlisten = \"127.0.0.1:1\"\nmax_body = \n");
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.message.contains("invalid TOML"), "{err}");
        let err = parse_err("[server]\n[server\n");
        assert_eq!(err.line, Some(2), "{err}");
        let err = parse_err("[server]\nsse_ping = \"1s\"\nsse_ping = \"2s\"\n");
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.message.contains("`sse_ping`"), "{err}");
    }

    // ---- runtimes ----

    #[test]
    fn duplicate_runtime_names_are_refused_with_both_lines() {
        let err = parse_err(
            "[[runtimes]]\nname = \"a\"\nsource = \"embedded\"\n\n\
             [[runtimes]]\nname = \"a\"\nsource = \"embedded\"\n",
        );
        assert_eq!(err.line, Some(6));
        assert!(err.message.contains("\"a\""), "{err}");
        assert!(err.message.contains("used twice"), "{err}");
        assert!(err.message.contains("line 2"), "{err}");
    }

    #[test]
    fn a_bad_runtime_name_is_refused_at_its_line() {
        let err = parse_err("[[runtimes]]\nsource = \"embedded\"\nname = \"GPU_box\"\n");
        assert_eq!(err.line, Some(3));
        assert!(err.message.contains("GPU_box"), "{err}");
        assert!(err.message.contains("lowercase"), "{err}");
        let err = parse_err("[[runtimes]]\nname = 7\nsource = \"embedded\"\n");
        assert_eq!(err.line, Some(2));
        assert!(err.message.contains("must be a string"), "{err}");
    }

    #[test]
    fn a_runtime_without_name_or_source_is_refused_at_its_header() {
        let err = parse_err("[server]\n\n[[runtimes]]\nsource = \"embedded\"\n");
        assert_eq!(err.line, Some(3));
        assert!(err.message.contains("`name`"), "{err}");
        let err = parse_err("[server]\n[[runtimes]]\nname = \"a\"\nmax_workers = 1\n");
        assert_eq!(err.line, Some(2));
        assert!(err.message.contains("`source`"), "{err}");
        assert!(err.message.contains("\"a\""), "{err}");
    }

    #[test]
    fn an_unknown_source_kind_lists_the_known_kinds_at_the_source_line() {
        let err = build_err("[[runtimes]]\nname = \"a\"\nmax_workers = 1\nsource = \"embeded\"\n");
        assert_eq!(err.line, Some(4));
        assert!(err.message.contains("\"embeded\""), "{err}");
        assert!(err.message.contains("known kinds: embedded"), "{err}");
        assert!(err.message.contains("runtime \"a\""), "{err}");
    }

    // ---- tokens ----

    #[test]
    fn a_token_secret_is_read_from_its_env_variable() {
        let var = "ROSTER_TEST_CONFIG_TOKEN_ENV_READ";
        std::env::set_var(var, "0123456789abcdef-env");
        let config = with_tokens(vec![token("console", Some(var), None)]);
        let tokens = config.load_tokens().unwrap();
        assert_eq!(tokens.len(), 1);
        assert_eq!(tokens[0].name, "console");
        assert_eq!(tokens[0].scope, Scope::Operate);
        assert_eq!(tokens[0].secret, "0123456789abcdef-env");
    }

    #[test]
    fn a_token_file_is_read_without_its_trailing_newline() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(b"0123456789abcdef-file\n").unwrap();
        let config = with_tokens(vec![token("viewer", None, Some(file.path()))]);
        let tokens = config.load_tokens().unwrap();
        assert_eq!(tokens[0].secret, "0123456789abcdef-file");
    }

    #[test]
    fn a_missing_env_variable_names_it_and_the_token_but_no_secret() {
        let set = "ROSTER_TEST_CONFIG_TOKEN_ENV_SET";
        let unset = "ROSTER_TEST_CONFIG_TOKEN_ENV_UNSET";
        std::env::set_var(set, "first-secret-0123456789");
        std::env::remove_var(unset);
        let config = with_tokens(vec![
            token("first", Some(set), None),
            token("second", Some(unset), None),
        ]);
        let err = load_err(&config);
        assert!(err.message.contains(unset), "{err}");
        assert!(err.message.contains("\"second\""), "{err}");
        assert!(err.message.contains("not set"), "{err}");
        assert!(!err.message.contains("first-secret"), "{err}");
    }

    #[test]
    fn a_short_or_empty_secret_is_refused_without_showing_it() {
        let var = "ROSTER_TEST_CONFIG_TOKEN_SHORT";
        std::env::set_var(var, "tiny-secret");
        let config = with_tokens(vec![token("console", Some(var), None)]);
        let err = load_err(&config);
        assert!(err.message.contains("shorter than 16 bytes"), "{err}");
        assert!(err.message.contains("\"console\""), "{err}");
        assert!(err.message.contains(var), "{err}");
        assert!(!err.message.contains("tiny-secret"), "{err}");

        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(b" \n\n").unwrap();
        let config = with_tokens(vec![token("blank", None, Some(file.path()))]);
        let err = load_err(&config);
        assert!(err.message.contains("empty"), "{err}");
        assert!(err.message.contains("\"blank\""), "{err}");
    }

    #[test]
    fn a_secret_with_spaces_inside_is_refused() {
        let var = "ROSTER_TEST_CONFIG_TOKEN_SPACES";
        std::env::set_var(var, "0123456789 abcdef ghij");
        let err = load_err(&with_tokens(vec![token("console", Some(var), None)]));
        assert!(err.message.contains("visible ASCII"), "{err}");
        assert!(!err.message.contains("abcdef"), "{err}");
    }

    #[test]
    fn an_unreadable_token_file_names_the_token_not_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such.token");
        let err = load_err(&with_tokens(vec![token("viewer", None, Some(&missing))]));
        assert!(err.message.contains("\"viewer\""), "{err}");
        assert!(err.message.contains("cannot be read"), "{err}");
        assert!(!err.message.contains("no-such.token"), "{err}");
    }

    #[test]
    fn a_token_with_both_or_neither_source_is_refused_at_its_line() {
        let err = parse_err(
            "[server]\n[[server.tokens]]\nname = \"a\"\nscope = \"read\"\n\
             token_env = \"A\"\ntoken_file = \"/a\"\n",
        );
        assert_eq!(err.line, Some(2));
        assert!(err.message.contains("exactly one"), "{err}");
        assert!(err.message.contains("\"a\""), "{err}");
        let err = parse_err(
            "[server]\n[[server.tokens]]\nname = \"a\"\nscope = \"read\"\ntoken_env = \"A\"\n\
             [[server.tokens]]\nname = \"b\"\nscope = \"read\"\n",
        );
        assert_eq!(err.line, Some(6));
        assert!(err.message.contains("exactly one"), "{err}");
        let err = load_err(&with_tokens(vec![token(
            "both",
            Some("X"),
            Some(Path::new("/x")),
        )]));
        assert!(err.message.contains("exactly one"), "{err}");
    }

    #[test]
    fn a_token_without_scope_or_with_a_bad_scope_is_refused() {
        let err = parse_err("[[server.tokens]]\nname = \"a\"\ntoken_env = \"A\"\n");
        assert_eq!(err.line, Some(1));
        assert!(err.message.contains("`scope`"), "{err}");
        let err =
            parse_err("[[server.tokens]]\nname = \"a\"\nscope = \"admin\"\ntoken_env = \"A\"\n");
        assert_eq!(err.line, Some(3));
        assert!(err.message.contains("scope"), "{err}");
    }

    #[test]
    fn duplicate_token_names_are_refused() {
        let err = parse_err(
            "[[server.tokens]]\nname = \"a\"\nscope = \"read\"\ntoken_env = \"A\"\n\
             [[server.tokens]]\nname = \"a\"\nscope = \"operate\"\ntoken_env = \"B\"\n",
        );
        assert_eq!(err.line, Some(5));
        assert!(err.message.contains("used twice"), "{err}");
        assert!(err.message.contains("line 1"), "{err}");

        let var = "ROSTER_TEST_CONFIG_TOKEN_DUP_NAME";
        std::env::set_var(var, "0123456789abcdef-dup");
        let err = load_err(&with_tokens(vec![
            token("a", Some(var), None),
            token("a", Some(var), None),
        ]));
        assert!(err.message.contains("used twice"), "{err}");
    }

    #[test]
    fn two_tokens_with_the_same_secret_are_refused_without_showing_it() {
        let (a, b) = (
            "ROSTER_TEST_CONFIG_TOKEN_SAME_A",
            "ROSTER_TEST_CONFIG_TOKEN_SAME_B",
        );
        std::env::set_var(a, "same-secret-0123456789");
        std::env::set_var(b, "same-secret-0123456789\n");
        let err = load_err(&with_tokens(vec![
            token("one", Some(a), None),
            token("two", Some(b), None),
        ]));
        assert!(err.message.contains("same secret"), "{err}");
        assert!(err.message.contains("\"one\"") && err.message.contains("\"two\""));
        assert!(!err.message.contains("same-secret-0123456789"), "{err}");
    }

    #[test]
    fn debug_output_shows_no_secret_state_dir_token_file_or_runtime_value() {
        let var = "ROSTER_TEST_CONFIG_TOKEN_DEBUG";
        std::env::set_var(var, "debug-secret-0123456789");
        let config = Config::parse(&format!(
            r#"[server]
state_dir = "/srv/hidden-state"
[[server.tokens]]
name = "console"
scope = "operate"
token_env = "{var}"
[[server.tokens]]
name = "viewer"
scope = "read"
token_file = "/etc/hidden/viewer.token"
[[runtimes]]
name = "gpu-box"
source = "remote"
url = "http://hidden.internal:7411"
"#
        ))
        .unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("hidden"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
        assert!(debug.contains("console") && debug.contains(var), "{debug}");
        assert!(debug.contains("url"), "{debug}");

        let only_env = with_tokens(vec![token("console", Some(var), None)]);
        let tokens = only_env.load_tokens().unwrap();
        let debug = format!("{tokens:?}");
        assert!(!debug.contains("debug-secret"), "{debug}");
        assert!(
            debug.contains("console") && debug.contains("<redacted>"),
            "{debug}"
        );
    }

    #[test]
    fn scope_operate_allows_everything_and_read_only_read() {
        assert!(Scope::Operate.allows(Scope::Operate));
        assert!(Scope::Operate.allows(Scope::Read));
        assert!(Scope::Read.allows(Scope::Read));
        assert!(!Scope::Read.allows(Scope::Operate));
    }

    // ---- listen ----

    fn listening_on(addr: &str) -> Config {
        let mut config = Config::default_embedded();
        config.server.listen = addr.parse().unwrap();
        config
    }

    fn a_token() -> LoadedToken {
        LoadedToken {
            name: "console".into(),
            scope: Scope::Operate,
            secret: "0123456789abcdef".into(),
        }
    }

    #[test]
    fn without_tokens_a_non_loopback_listen_is_refused_with_the_reason_and_the_fix() {
        for addr in ["0.0.0.0:7411", "[::]:7411", "192.168.1.10:7411"] {
            let err = listening_on(addr).check_listen(&[]).unwrap_err();
            assert!(err.message.contains("without tokens"), "{err}");
            assert!(err.message.contains("start processes"), "{err}");
            assert!(err.message.contains("[[server.tokens]]"), "{err}");
            assert!(err.message.contains("127.0.0.1"), "{err}");
            assert!(err.message.contains("[::1]"), "{err}");
        }
    }

    #[test]
    fn without_tokens_a_loopback_listen_is_accepted() {
        for addr in [
            "127.0.0.1:7411",
            "[::1]:7411",
            "127.0.0.2:80",
            "[::ffff:127.0.0.1]:1",
        ] {
            listening_on(addr).check_listen(&[]).unwrap();
        }
    }

    #[test]
    fn with_tokens_any_listen_is_accepted() {
        listening_on("0.0.0.0:7411")
            .check_listen(&[a_token()])
            .unwrap();
    }

    // ---- files and errors ----

    #[test]
    fn load_reads_a_file_and_an_unreadable_one_says_so() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(b"[server]\nlisten = \"127.0.0.1:9100\"\n")
            .unwrap();
        let config = Config::load(file.path()).unwrap();
        assert_eq!(config.server.listen.port(), 9100);

        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("roster.toml");
        let err = Config::load(&missing).unwrap_err();
        assert_eq!(err.line, None);
        assert!(err.message.contains("cannot read the config file"), "{err}");
        assert!(err.message.contains("roster.toml"), "{err}");
    }

    #[test]
    fn config_file_error_displays_its_line_when_known() {
        let with = ConfigFileError {
            line: Some(7),
            message: "bad".into(),
        };
        assert_eq!(with.to_string(), "line 7: bad");
        let without = ConfigFileError {
            line: None,
            message: "bad".into(),
        };
        assert_eq!(without.to_string(), "bad");
    }
}
