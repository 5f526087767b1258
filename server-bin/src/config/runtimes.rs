//! The `[[runtimes]]` entries: each runtime's id, kind and table, the default runtime, and
//! building the sources, with a factory's error placed at the line of the key it is about.

use std::collections::HashMap;
use std::sync::Arc;

use registry_core::{
    ConfigError, RedactedValues, RuntimeId, RuntimeSource, SourceConfig, SourceFactories,
};

use super::check::{culprit, remove};
use super::lines::{
    backticked, known_line, parent, plain, plain_words, split_context, ConfigFileError, KeyIndex,
};
use super::{Config, ConfigErrors};

/// The name of the runtime a file without `[[runtimes]]` gets.
const DEFAULT_RUNTIME: &str = "local";

/// One `[[runtimes]]` entry.
///
/// `Debug` shows the id, the kind and the key names of the table, never its values (they
/// may be URLs or paths: the table is [`RedactedValues`]).
#[derive(Clone, Debug)]
pub struct RuntimeSection {
    /// The runtime's id (its `name`).
    pub id: RuntimeId,
    /// The source kind (its `source`), e.g. `"embedded"`.
    pub kind: String,
    /// The table without `name` and `source`: the source's own settings.
    pub table: RedactedValues<toml::Table>,
    /// The 1-based line of the runtime's `[[runtimes]]` header (or of its inline table);
    /// 0 for a runtime that is not written in a file.
    pub line: usize,
    /// The line of the `source` key; 0 when unknown.
    source_line: usize,
    /// Every key of `table` at any depth, in file order; empty when not from a file.
    keys: Vec<TableKey>,
}

/// A key of a runtime's table and the line it is on.
#[derive(Clone, Debug)]
struct TableKey {
    /// The dotted path from the runtime's table without array indices, as toml names it in
    /// its messages, e.g. `profiles.shell.command`.
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
            table: RedactedValues(table),
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
        let message = plain_words(err.message.trim());
        let message = message.as_str();
        let runtime = format!("runtime \"{}\"", self.id);
        if !kind_known {
            return ConfigFileError::new(
                known_line(self.source_line).or(known_line(self.line)),
                format!("{runtime}: {message}"),
            );
        }
        let plain = || ConfigFileError::new(known_line(self.line), format!("{runtime}: {message}"));
        let line_of_path = |path: &str| self.keys.iter().find(|k| k.path == path).map(|k| k.line);

        if let Some(path) = err.path.as_deref() {
            // Without array indices: `command[1]` is at the line of `command`.
            return self.error_at_path(&runtime, message, &super::lines::plain(path));
        }
        // A source that gives no path (a kind of somebody else's): the key is found by the
        // names the message quotes.

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

impl RuntimeSection {
    /// A factory's error about the value at `path` (without array indices): at the line of
    /// a key of that table the message quotes (an unknown key, a missing one's table), else
    /// of the path itself or its nearest written parent, else at the runtime's line. The
    /// message names the table (`in `profiles.shell`: …`) or the key (`` `grace`: … ``).
    fn error_at_path(&self, runtime: &str, message: &str, path: &str) -> ConfigFileError {
        let line_of_path = |path: &str| self.keys.iter().find(|k| k.path == path).map(|k| k.line);
        let quoted = backticked(message).find_map(|name| {
            let full = format!("{path}.{name}");
            line_of_path(&full).map(|line| (line, full))
        });
        let leaf = path.rsplit('.').next().unwrap_or(path);
        let names_leaf = message.contains(&format!("`{leaf}`"));
        let text = if split_context(message).is_some() {
            // It names its table already (as toml's messages do).
            format!("{runtime}: {message}")
        } else if quoted.is_some() {
            format!("{runtime}: in `{path}`: {message}")
        } else if names_leaf {
            match parent(path) {
                Some(parent) => format!("{runtime}: in `{parent}`: {message}"),
                None => format!("{runtime}: {message}"),
            }
        } else {
            format!("{runtime}: `{path}`: {message}")
        };
        let line = quoted.map(|(line, _)| line).or_else(|| {
            let mut at = Some(path);
            while let Some(p) = at {
                if let Some(line) = line_of_path(p) {
                    return Some(line);
                }
                at = parent(p);
            }
            None
        });
        ConfigFileError::new(line.or(known_line(self.line)), text)
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

impl Config {
    /// What the factory of `runtime`'s kind gets: the runtime's id, its table (without
    /// `name` and `source`) and `<state_dir>/runtimes/<id>` as its state directory.
    pub fn source_config(&self, runtime: &RuntimeSection) -> SourceConfig {
        SourceConfig {
            runtime_id: runtime.id.clone(),
            table: runtime.table.clone(),
            state_dir: self
                .server
                .state_dir
                .join("runtimes")
                .join(runtime.id.as_str())
                .into(),
        }
    }

    /// Builds and starts every runtime's source, in file order, with
    /// `factories.build(kind, config)`, where the config holds the runtime's id, its table
    /// (without `name` and `source`) and `<state_dir>/runtimes/<id>` as its state
    /// directory.
    ///
    /// A factory's error becomes an error naming the runtime. One with a key path
    /// ([`ConfigError::path`], which every in-tree kind gives) is placed at that key's line
    /// (or at the line of the key of that table the message quotes, or of its nearest
    /// written parent). One without (a kind of somebody else's) is placed by what its
    /// message quotes: a message that ends with the table it is about
    /// (``… in `profiles.shell` ``) at the line of the key of that table it names, else at
    /// the table's line; any other at the line of the key it names (at any depth of the
    /// runtime's table); else at the runtime's line. An
    /// unknown kind is reported at the line of `source` with the known kinds. On an error
    /// the sources built so far are dropped without a shutdown: call this before anything
    /// depends on them. Call it inside a Tokio runtime: a source such as `embedded` starts
    /// tasks when it is built.
    pub fn build_sources(
        &self,
        factories: &SourceFactories,
    ) -> Result<Vec<BuiltRuntime>, ConfigFileError> {
        let (built, errors) = self.build_every(factories);
        match ConfigErrors::in_file_order(errors).into_first() {
            Some(first) => Err(first),
            None => Ok(built),
        }
    }

    /// [`build_sources`](Self::build_sources), going on past errors: every source that
    /// builds, and every error. When a source's error names a key path, the source is
    /// built again without that key, to find the next error of its table (up to one try
    /// per key; an error without a path, or about a missing key, ends that runtime).
    pub(super) fn build_every(
        &self,
        factories: &SourceFactories,
    ) -> (Vec<BuiltRuntime>, Vec<ConfigFileError>) {
        let kinds = factories.kinds();
        let mut built = Vec::with_capacity(self.runtimes.len());
        let mut errors = Vec::new();
        for runtime in &self.runtimes {
            let kind_known = kinds.contains(&runtime.kind.as_str());
            let mut table = runtime.table.clone();
            for attempt in 0..=runtime.keys.len() {
                let mut config = self.source_config(runtime);
                config.table = table.clone();
                match factories.build(&runtime.kind, config) {
                    Ok(source) => {
                        // A table with keys taken out only finds errors; its source is
                        // not kept.
                        if table == runtime.table {
                            built.push(BuiltRuntime {
                                id: runtime.id.clone(),
                                kind: runtime.kind.clone(),
                                source,
                            });
                        }
                        break;
                    }
                    Err(e) => {
                        // On a table with keys taken out, only an error about a key of its
                        // own counts: a missing key or a source that can't start may be
                        // what taking a key out caused.
                        let own = e.path.is_some() || e.message.starts_with("unknown field");
                        if attempt > 0 && (!own || e.message.starts_with("missing field")) {
                            break;
                        }
                        errors.push(runtime.factory_error(&e, kind_known));
                        let culprit = e
                            .path
                            .as_deref()
                            .or(Some(""))
                            .and_then(|p| culprit(p, &e.message));
                        match culprit {
                            Some(path) if kind_known && remove(&mut table.0, &path) => {}
                            _ => break,
                        }
                    }
                }
            }
        }
        (built, errors)
    }
}

/// The runtime a file without `[[runtimes]]` gets.
pub(super) fn default_runtime() -> RuntimeSection {
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

/// Checks the runtimes, each given with the line of its table: each has a valid, unique
/// `name` and a string `source`. `index` is the index of the whole file, where runtime
/// `i`'s keys stand under `runtimes[i]`. Every runtime that is right, and every error of
/// those that are not.
pub(super) fn every_runtime(
    raws: Vec<(usize, toml::Table)>,
    index: &KeyIndex,
) -> (Vec<RuntimeSection>, Vec<ConfigFileError>) {
    let mut first_line_of: HashMap<RuntimeId, usize> = HashMap::new();
    let mut runtimes = Vec::with_capacity(raws.len());
    let mut errors = Vec::new();
    for (i, (line, mut table)) in raws.into_iter().enumerate() {
        match one_runtime(i, line, &mut table, index, &mut first_line_of) {
            Ok((id, kind, source_line, keys)) => runtimes.push(RuntimeSection {
                id,
                kind,
                table: RedactedValues(table),
                line,
                source_line,
                keys,
            }),
            Err(e) => errors.push(e),
        }
    }
    (runtimes, errors)
}

/// Runtime `i`'s `name` and `source` (taken out of `table`), the line of `source` and the
/// lines of the other keys.
fn one_runtime(
    i: usize,
    line: usize,
    table: &mut toml::Table,
    index: &KeyIndex,
    first_line_of: &mut HashMap<RuntimeId, usize>,
) -> Result<(RuntimeId, String, usize, Vec<TableKey>), ConfigFileError> {
    {
        let prefix = format!("runtimes[{i}].");
        let line_of_key = |name: &str| index.line(&format!("{prefix}{name}")).unwrap_or(line);

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

        let key_lines: Vec<TableKey> = index
            .keys_under(&prefix)
            .map(|k| (plain(&k.path[prefix.len()..]), k.line))
            .filter(|(path, _)| path != "name" && path != "source")
            .map(|(path, line)| TableKey {
                leaf: path.rsplit('.').next().unwrap_or(&path).to_string(),
                path,
                line,
            })
            .collect();

        Ok((id, kind, source_line, key_lines))
    }
}
